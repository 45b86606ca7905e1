"""Engine defaults for this machine: float32 where the CPU would only emulate bfloat16."""

from lingosteer.backend import cpu_has_native_bfloat16, engine_kwargs, is_cpu_backend


def test_native_bfloat16_read_from_cpu_flags(tmp_path):
    emulated = tmp_path / "emulated"
    emulated.write_text("flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n")
    native = tmp_path / "native"
    native.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert not cpu_has_native_bfloat16(emulated)
    assert cpu_has_native_bfloat16(native)
    assert cpu_has_native_bfloat16(tmp_path / "missing")  # unknown: keep the model's dtype


def test_engine_defaults_follow_the_cpu_and_overrides_win(tmp_path):
    kwargs = engine_kwargs(tmp_path, max_model_len=64)
    assert kwargs["model"] == str(tmp_path) and kwargs["max_model_len"] == 64
    expect_float32 = is_cpu_backend() and not cpu_has_native_bfloat16()
    assert (kwargs.get("dtype") == "float32") == expect_float32
    assert engine_kwargs(tmp_path, dtype="bfloat16")["dtype"] == "bfloat16"
