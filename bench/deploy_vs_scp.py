"""Deploy of a 4 MB bundle to a local agent, from the push until the agent reports ``activated``, over ssh and
over MQTT, against a plain ``scp`` of the same file, in the same run.

A private OpenSSH server and a private Mosquitto on loopback, and one real agent (``edge-agent run`` serving
its model store, with an inbox and MQTT) in a subprocess. Each round pushes a new version (the conversion is
cached: the bundles are built before timing), so every deploy does the full activation: verify, unpack
into a slot, smoke test (load, golden outputs), switch, health window, commit. The three methods take turns
within each round; the table shows the median over the rounds.

  ssh copy      the same transport into a folder no agent watches, without waiting (the copy alone)
  ssh push      ``SshTransport.push(wait)``: one ssh session streams the bundle into the inbox and waits
                for the agent's result file
  mqtt push     ``MqttTransport.push(wait)``: QoS 1 chunks to the device topic, then the ``activated`` event
  edgekit push  the same ssh push through the ``edgekit push`` command (a new Python process each time)
  scp           ``scp`` of the same file to the same server (nothing is activated)

    .venv/bin/python bench/deploy_vs_scp.py [--rounds 5] [--mb 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters.keys import init_keys  # noqa: E402
from converters.push import parse_target  # noqa: E402
from converters.push.mqtt import MqttTransport  # noqa: E402
from converters.push.ssh import SshTransport  # noqa: E402
from tests.deploy_helpers import AgentProc, golden_bundle  # noqa: E402
from tests.mosquitto import Mosquitto  # noqa: E402
from tests.sshd import Sshd  # noqa: E402


def hidden_for(mb: float, in_features: int = 1024) -> int:
    """Hidden units of the MLP whose float32 weights take about ``mb`` MB."""
    return max(8, int(mb * 1e6 / 4 / (in_features + 4)))


def timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mb", type=float, default=4.0, help="bundle size in MB (default 4)")
    ap.add_argument("--agent-threads", type=int, default=1,
                    help="intra-op threads of the serving agent (default 1: the x86-64 profile's 4 spinning "
                         "onnxruntime threads would take both cores of a 2-core machine from ssh and scp)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-deploy-") as d:
        tmp = Path(d)
        private, pub = init_keys(tmp / "keys")
        n_bundles = 3 * args.rounds
        bundles = [golden_bundle(tmp / f"mlp-1.0.{i}.edgebundle", private, version=f"1.0.{i}", seed=i,
                                 in_features=1024, hidden=hidden_for(args.mb)) for i in range(n_bundles)]
        size = bundles[0].stat().st_size
        sshd = Sshd(tmp / "sshd").start()
        broker = Mosquitto(tmp / "broker").start()
        inbox, scp_dst = tmp / "inbox", tmp / "scp-dst"
        scp_dst.mkdir()
        agent = AgentProc("--state-dir", str(tmp / "state"), "--inbox", str(inbox), "--pubkey", str(pub),
                          "--mqtt", broker.address, "--device-id", "bench-dev", "--window", "1",
                          "--threads", str(args.agent_threads))
        try:
            opts = sshd.ssh_options()
            ssh = SshTransport(parse_target(sshd.target(str(inbox))), ssh_options=opts)
            mqtt = MqttTransport(parse_target(f"mqtt://{broker.address}/device/bench-dev"))
            scp = ["scp", "-q", *opts, "-P", str(sshd.port)]
            cli = [sys.executable, "-m", "converters.cli", "push", "--json", "--wait", "60",
                   *[f"--ssh-option={o}" for o in opts], "--to", sshd.target(str(inbox))]
            # warm-up: the first activation (empty store), the ssh host key, Python's caches
            first = ssh.push(bundles[0], wait_s=60)
            assert first.state == "activated", first
            times: dict[str, list[float]] = {"ssh": [], "mqtt": [], "cli": [], "scp": [], "ssh_copy": []}
            other = SshTransport(parse_target(sshd.target(str(tmp / "not-an-inbox"))), ssh_options=opts)
            k = 1
            for r in range(args.rounds):
                for method in ("scp", "ssh_copy", "ssh", "mqtt", "cli"):
                    if method == "ssh_copy":  # the same transport into a folder no agent watches, no wait
                        t, res = timed(lambda: other.push(bundles[0]))
                        assert res.state == "pushed", res
                    elif method == "scp":
                        t, out = timed(lambda r=r: subprocess.run([*scp, str(bundles[0]),
                                                               f"{sshd.user}@127.0.0.1:{scp_dst}/b{r}"],
                                                              capture_output=True, text=True))
                        assert out.returncode == 0, out.stderr
                    elif method == "cli":
                        b = bundles[k % n_bundles]
                        k += 1
                        t, out = timed(lambda b=b: subprocess.run([*cli[:4], str(b), *cli[4:]],
                                                                  capture_output=True, text=True, cwd=ROOT))
                        assert out.returncode == 0, out.stderr + out.stdout
                    else:
                        b = bundles[k % n_bundles]
                        k += 1
                        tr = ssh if method == "ssh" else mqtt
                        t, res = timed(lambda tr=tr, b=b: tr.push(b, wait_s=60))
                        assert res.state == "activated", res
                    times[method].append(t)
        finally:
            agent.stop()
            broker.stop()
            sshd.stop()
    med = {m: statistics.median(v) for m, v in times.items()}
    result = {"bundle_bytes": size, "rounds": args.rounds, "agent_threads": args.agent_threads,
              "median_s": {m: round(v, 4) for m, v in med.items()},
              "ssh_vs_scp": round(med["ssh"] / med["scp"], 2), "mqtt_vs_scp": round(med["mqtt"] / med["scp"], 2),
              "ssh_copy_vs_scp": round(med["ssh_copy"] / med["scp"], 2),
              "edgekit_push_vs_scp": round(med["cli"] / med["scp"], 2)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"bundle {size / 1e6:.1f} MB, {args.rounds} rounds, loopback, agent serving with {args.agent_threads} "
          "thread(s); medians (s) and ratio to scp")
    print(f"{'method':<44} {'seconds':>8} {'vs scp':>7}")
    for name, m in (("scp (copy only)", "scp"), ("ssh push, copy only (no agent, no wait)", "ssh_copy"),
                    ("ssh push -> activated", "ssh"),
                    ("mqtt push -> activated", "mqtt"), ("edgekit push (CLI, ssh) -> activated", "cli")):
        print(f"{name:<44} {med[m]:>8.3f} {med[m] / med['scp']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
