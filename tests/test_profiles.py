"""Device profiles: the shipped ones load, and every kind of mistake is a ProfileError naming the file,
the key path and what is allowed. Broken profiles are made by copying a shipped TOML and editing text."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import ProfileError
from edge_agent.profiles import (
    PROFILES_ENV,
    Profile,
    available_profiles,
    builtin_profiles_dir,
    list_profiles,
    load_profile,
    load_profile_file,
)

SHIPPED = {"rpi4", "rpi5", "coral-usb", "coral-devboard", "jetson-nano", "jetson-orin-nano", "x86-64"}


@pytest.fixture(autouse=True)
def _no_profiles_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROFILES_ENV, raising=False)


def make_profile(folder: Path, name: str, base: str = "x86-64", edits: tuple[tuple[str, str], ...] = (),
                 rename: bool = True) -> Path:
    """Copy a shipped profile to ``folder/<name>.toml``, replacing each ``old`` text (found exactly once)."""
    text = (builtin_profiles_dir() / f"{base}.toml").read_text()
    if rename:
        edits = ((f'name = "{base}"', f'name = "{name}"'), *edits)
    for old, new in edits:
        assert text.count(old) == 1, f"{old!r} not found exactly once in {base}.toml"
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def broken(tmp_path: Path, *edits: tuple[str, str], base: str = "x86-64") -> tuple[Path, ProfileError]:
    path = make_profile(tmp_path, "board", base, edits)
    with pytest.raises(ProfileError) as e:
        load_profile_file(path)
    assert str(path) in e.value.message
    assert e.value.hint
    return path, e.value


# --------------------------------------------------------------------------------------------------
# shipped profiles


def test_every_shipped_profile_loads() -> None:
    found = available_profiles()
    assert set(found) >= SHIPPED
    profiles = list_profiles()
    assert {p.name for p in profiles} >= SHIPPED
    for p in profiles:
        assert isinstance(p, Profile)
        assert Path(p.source_file).stem == p.name
        assert "source_file" not in p.to_dict()
        assert p.runtime.threads >= 1


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_profile_by_name_and_by_path(name: str) -> None:
    by_name = load_profile(name)
    by_path = load_profile(str(builtin_profiles_dir() / f"{name}.toml"))
    assert by_name == by_path
    expected_engine = {"tflite": "litert", "onnx": "onnxruntime"}[by_name.target.format]
    assert by_name.runtime.engine == expected_engine


def test_shipped_profiles_sample_values() -> None:
    rpi4 = load_profile("rpi4")
    assert rpi4.runtime.delegates == ("xnnpack",) and rpi4.target.format == "tflite"
    orin = load_profile("jetson-orin-nano")
    assert orin.runtime.providers[0] == "TensorrtExecutionProvider"
    assert orin.runtime.providers[-1] == "CPUExecutionProvider"
    assert load_profile("x86-64").telemetry.qos == 1


# --------------------------------------------------------------------------------------------------
# mistakes


def test_unknown_top_level_key(tmp_path: Path) -> None:
    _, err = broken(tmp_path, ("schema = 1\n", "schema = 1\ncolour = 1\n"))
    assert ": colour: unknown key" in err.message
    assert "allowed keys here: schema, device, target, quantization, runtime, power, thermal, telemetry" \
        in err.message


def test_unknown_nested_key(tmp_path: Path) -> None:
    _, err = broken(tmp_path, ("threads = 4", "thredas = 4"))
    assert "runtime.thredas: unknown key" in err.message
    assert "allowed keys here: engine, threads, cpu_fallback, delegates, providers" in err.message


def test_unknown_table(tmp_path: Path) -> None:
    _, err = broken(tmp_path, ("[power]", "[powr]"))
    assert ": powr: unknown key" in err.message


def test_wrong_type(tmp_path: Path) -> None:
    _, err = broken(tmp_path, ("threads = 4", 'threads = "4"'))
    assert "runtime.threads: expected integer, got str '4'" in err.message


@pytest.mark.parametrize(("old", "new", "where"), [
    ("per_channel = true", "per_channel = 1", "quantization.per_channel"),
    ("cpu_fallback = true", 'cpu_fallback = "yes"', "runtime.cpu_fallback"),
    ('providers = ["CPUExecutionProvider"]', 'providers = "CPUExecutionProvider"', "runtime.providers"),
    ("sample_hz = 10", "sample_hz = true", "power.sample_hz"),
    ('zones = ["x86_pkg_temp"]', "zones = [1]", "thermal.zones[0]"),
])
def test_other_wrong_types(tmp_path: Path, old: str, new: str, where: str) -> None:
    _, err = broken(tmp_path, (old, new))
    assert f"{where}: expected" in err.message


def test_value_outside_the_allowed_set(tmp_path: Path) -> None:
    _, err = broken(tmp_path, ('mode = "int8"', 'mode = "int4"'))
    assert "quantization.mode: 'int4' is not allowed" in err.message
    assert "allowed values: 'int8', 'dynamic', 'fp16', 'none'" in err.message


def test_list_item_outside_the_allowed_set(tmp_path: Path) -> None:
    _, err = broken(tmp_path, ('providers = ["CPUExecutionProvider"]', 'providers = ["GPUExecutionProvider"]'))
    assert "runtime.providers[0]: 'GPUExecutionProvider' is not allowed" in err.message
    assert "'CPUExecutionProvider'" in err.message


def test_value_below_the_minimum(tmp_path: Path) -> None:
    _, err = broken(tmp_path, ("threads = 4", "threads = 0"))
    assert "runtime.threads: must be at least 1" in err.message


def test_quantization_gate_and_ladder_defaults_keep_shipped_profiles_valid() -> None:
    for p in list_profiles():
        q = p.quantization
        assert (q.exclude_nodes, q.exclude_op_types, q.ladder) == ((), (), True)
        assert (q.gate_min_accuracy_ratio, q.gate_min_agreement, q.gate_min_snr_db) == (0.99, 0.99, 20.0)
        assert q.max_calibration_memory_mb == 512


def test_quantization_gate_and_ladder_keys(tmp_path: Path) -> None:
    extra = ('validation_samples = 200\nexclude_nodes = ["conv1", "head/Gemm"]\nexclude_op_types = ["Softmax"]\n'
             "gate_min_accuracy_ratio = 0.98\ngate_min_agreement = 1\ngate_min_snr_db = 30\nladder = false\n"
             "max_calibration_memory_mb = 64")
    path = make_profile(tmp_path, "board", edits=(("validation_samples = 200", extra),))
    q = load_profile_file(path).quantization
    assert q.exclude_nodes == ("conv1", "head/Gemm") and q.exclude_op_types == ("Softmax",)
    assert (q.gate_min_accuracy_ratio, q.gate_min_agreement, q.gate_min_snr_db) == (0.98, 1.0, 30.0)
    assert q.ladder is False and q.max_calibration_memory_mb == 64


@pytest.mark.parametrize(("line", "message"), [
    ("gate_min_accuracy_ratio = 1.5", "quantization.gate_min_accuracy_ratio: must be at most 1, got 1.5"),
    ("gate_min_agreement = -0.1", "quantization.gate_min_agreement: must be at least 0, got -0.1"),
    ("ladder = 1", "quantization.ladder: expected true/false"),
    ("max_calibration_memory_mb = 0", "quantization.max_calibration_memory_mb: must be at least 1"),
    ('exclude_nodes = "conv1"', "quantization.exclude_nodes: expected a list"),
    ("exclude_op_types = [1]", "quantization.exclude_op_types[0]: expected string"),
])
def test_quantization_gate_and_ladder_mistakes(tmp_path: Path, line: str, message: str) -> None:
    _, err = broken(tmp_path, ("validation_samples = 200", f"validation_samples = 200\n{line}"))
    assert message in err.message


def test_missing_required_key(tmp_path: Path) -> None:
    _, err = broken(tmp_path, ("cores = 4 ", "# cores = 4 "))
    assert "device.cores: missing required key" in err.message


def test_name_must_equal_the_file_stem(tmp_path: Path) -> None:
    path = make_profile(tmp_path, "my-board", rename=False)  # device.name stays "x86-64"
    with pytest.raises(ProfileError) as e:
        load_profile_file(path)
    assert str(path) in e.value.message
    assert "device.name: 'x86-64' must equal the file name 'my-board'" in e.value.message


def test_bad_toml(tmp_path: Path) -> None:
    _, err = broken(tmp_path, ("threads = 4", "threads = = 4"))
    assert "not valid TOML" in err.message


def test_unsupported_schema(tmp_path: Path) -> None:
    _, err = broken(tmp_path, ("schema = 1\n", "schema = 2\n"))
    assert "schema: schema version 2 is not supported" in err.message


@pytest.mark.parametrize(("base", "edits", "where"), [
    ("x86-64", (('format = "onnx"', 'format = "tflite"'),), "runtime.engine"),
    ("rpi4", (('format = "tflite"', 'format = "onnx"'),), "runtime.engine"),
    ("x86-64", (("threads = 4", 'threads = 4\ndelegates = ["xnnpack"]'),), "runtime.delegates"),
    ("rpi4", (("threads = 4", 'threads = 4\nproviders = ["CPUExecutionProvider"]'),), "runtime.providers"),
    ("x86-64", (('providers = ["CPUExecutionProvider"]', "providers = []"),), "runtime.providers"),
    ("x86-64", (('providers = ["CPUExecutionProvider"]', 'providers = ["CUDAExecutionProvider"]'),),
     "runtime.providers"),
    ("rpi4", (('delegates = ["xnnpack"]', 'delegates = ["tpu"]'),), "runtime.delegates[0]"),
    ("rpi4", (('delegates = ["xnnpack"]', 'delegates = ["external:"]'),), "runtime.delegates[0]"),
    ("x86-64", (('source = "rapl"', 'source = "hwmon:"'),), "power.source"),
    ("x86-64", (('source = "rapl"', 'source = "serial:um99"'),), "power.source"),
    ("x86-64", (('source = "rapl"', 'source = "battery"'),), "power.source"),
    ("x86-64", (('mode = "int8"', 'mode = "fp16"'), ('io_dtype = "float32"', 'io_dtype = "int8"')),
     "quantization.io_dtype"),
])
def test_cross_field_rules(tmp_path: Path, base: str, edits: tuple, where: str) -> None:
    _, err = broken(tmp_path, *edits, base=base)
    assert f": {where}" in err.message


@pytest.mark.parametrize("source", ["hwmon:ina3221", "serial:um25c", "pmic", "none"])
def test_power_source_forms_that_are_allowed(tmp_path: Path, source: str) -> None:
    path = make_profile(tmp_path, "board", edits=(('source = "rapl"', f'source = "{source}"'),))
    assert load_profile_file(path).power.source == source


def test_external_delegate_is_allowed(tmp_path: Path) -> None:
    path = make_profile(tmp_path, "board", "rpi4",
                        (('delegates = ["xnnpack"]', 'delegates = ["external:/opt/libvx_delegate.so"]'),))
    assert load_profile_file(path).runtime.delegates == ("external:/opt/libvx_delegate.so",)


def test_missing_profile_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile_file(tmp_path / "nope.toml")


# --------------------------------------------------------------------------------------------------
# user profile folders


def test_profiles_dir_extends_and_shadows_the_builtins(tmp_path: Path) -> None:
    d = tmp_path / "mine"
    make_profile(d, "lab-box")
    make_profile(d, "x86-64", edits=(("threads = 4", "threads = 2"),), rename=False)
    assert load_profile("x86-64").runtime.threads == 4  # without the folder: the shipped one
    mine = load_profile("x86-64", profiles_dir=d)
    assert mine.runtime.threads == 2
    assert Path(mine.source_file).parent == d
    assert load_profile("lab-box", profiles_dir=d).name == "lab-box"
    found = available_profiles(d)
    assert set(found) >= SHIPPED | {"lab-box"}
    assert found["x86-64"].parent == d and found["rpi4"].parent == builtin_profiles_dir()
    assert {p.name for p in list_profiles(d)} >= SHIPPED | {"lab-box"}


def test_env_var_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir = tmp_path / "env"
    make_profile(env_dir, "env-box")
    make_profile(env_dir, "x86-64", edits=(("threads = 4", "threads = 3"),), rename=False)
    with pytest.raises(ProfileError):
        load_profile("env-box")
    monkeypatch.setenv(PROFILES_ENV, str(env_dir))
    assert load_profile("env-box").name == "env-box"
    assert load_profile("x86-64").runtime.threads == 3
    # --profiles-dir comes before the environment variable
    arg_dir = tmp_path / "arg"
    make_profile(arg_dir, "x86-64", edits=(("threads = 4", "threads = 2"),), rename=False)
    assert load_profile("x86-64", profiles_dir=arg_dir).runtime.threads == 2
    assert set(available_profiles(arg_dir)) >= SHIPPED | {"env-box"}


def test_an_invalid_user_profile_is_reported_by_list(tmp_path: Path) -> None:
    d = tmp_path / "mine"
    make_profile(d, "bad-box", edits=(("threads = 4", "threads = -1"),))
    with pytest.raises(ProfileError, match=r"bad-box\.toml"):
        list_profiles(d)


def test_unknown_profile_name_lists_the_known_ones(tmp_path: Path) -> None:
    d = tmp_path / "mine"
    make_profile(d, "lab-box")
    with pytest.raises(ProfileError) as e:
        load_profile("rpi9", profiles_dir=d)
    assert "unknown profile 'rpi9'" in e.value.message
    for name in SHIPPED | {"lab-box"}:
        assert name in e.value.message
    assert PROFILES_ENV in (e.value.hint or "")


def test_missing_profiles_dir_is_an_error_not_skipped(tmp_path, monkeypatch):
    from edge_agent.errors import ProfileError
    from edge_agent.profiles import load_profile

    with pytest.raises(ProfileError, match=r"--profiles-dir .* is not a folder"):
        load_profile("rpi5", tmp_path / "absent")
    monkeypatch.setenv("EDGEKIT_PROFILES_DIR", str(tmp_path / "absent-too"))
    with pytest.raises(ProfileError, match=r"EDGEKIT_PROFILES_DIR .* is not a folder"):
        load_profile("rpi5")
