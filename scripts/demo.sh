#!/usr/bin/env bash
# The edgekit demo, on this machine's CPU, downloading nothing at run time:
#   1. make a sample model: a small CNN trained on scikit-learn's bundled digits (real data, no download)
#   2. a throwaway signing key pair (in demo-out/, not your ~/.config)
#   3. quantize it for the x86-64 profile (ONNX static INT8) into a signed, validated bundle
#   4. the agent verifies the bundle and benchmarks it
#   5. the agent runs it for ~10 s on held-out digit images, with telemetry over MQTT to a private
#      Mosquitto broker on a free loopback port, and prints the latency table
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=demo-out
rm -rf "$OUT"
mkdir -p "$OUT"
THREADS=$(nproc)
[ "$THREADS" -gt 4 ] && THREADS=4
BIN=.venv/bin
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/5 sample model: a small CNN trained on scikit-learn's bundled 8x8 digits"
TF_CPP_MIN_LOG_LEVEL=3 $BIN/python examples/make_digits_model.py "$OUT/digits"

step "2/5 a throwaway Ed25519 signing key pair for this demo"
$BIN/edgekit keys init --dir "$OUT/keys"

step "3/5 quantize for the x86-64 profile (ONNX static INT8, per-channel) into a signed bundle"
$BIN/edgekit convert "$OUT/digits/digits_fp32.onnx" --profile x86-64 \
  --calib "$OUT/digits/calib" --labels "$OUT/digits/labels.txt" \
  --size 8x8 --color gray --layout NCHW \
  --key "$OUT/keys/edgekit-signing.key" --out "$OUT/bundles" --name digits --threads "$THREADS"
BUNDLE="$OUT/bundles/digits-1.0.0-x86-64.edgebundle"
PUB="$OUT/keys/edgekit-signing.pub"
$BIN/edgekit bundle verify "$BUNDLE" --pubkey "$PUB"

step "4/5 the agent verifies and benchmarks the bundle (warm-up excluded)"
# --power none: the x86-64 profile reads Intel RAPL, which VMs and containers rarely expose (and which
# is root-only on recent kernels); firmware_notes/x86-64.md says how to enable it on a real box.
$BIN/edge-agent bench --bundle "$BUNDLE" --pubkey "$PUB" --threads "$THREADS" --warmup 200 --count 5000 \
  --power none

step "5/5 the agent runs for 10 s on the held-out digit images, telemetry windows of 2 s over MQTT"
exec $BIN/python examples/demo_run.py --bundle "$BUNDLE" --pubkey "$PUB" --threads "$THREADS" \
  --images "$OUT/digits/test" --duration 10 --window 2 --state-dir "$OUT/state"
