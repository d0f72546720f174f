"""lm/attention_plan.py: the selection table, explicit kernels that cannot run refused as config
errors before anything compiles, and a planned kernel's per-length rule."""

import pytest

from configs.smoke import get_config
from launch.run.config import validate
from launch.run.plan import decide
from lm import attention_plan

# (requested, platform, dtype, head_dim, seq_len, capability) -> (implementation, words in the reason)
TABLE = [
    ("auto", "cpu", "float32", 64, 4096, None, "xla", "no fused attention kernel on cpu"),
    ("auto", "cpu", "bfloat16", 64, 4096, None, "xla", "no fused attention kernel on cpu"),
    ("auto", "cuda", "bfloat16", 64, 4096, "9.0", "cudnn", "cuDNN fused flash attention"),
    ("auto", "cuda", "float16", 128, 2048, "8.0", "cudnn", "cuDNN fused flash attention"),
    ("auto", "cuda", "float32", 64, 4096, "9.0", "xla", "needs bfloat16 or float16"),
    ("auto", "cuda", "bfloat16", 192, 4096, "8.0", "xla", "at most 128"),
    ("auto", "cuda", "bfloat16", 192, 4096, "9.0", "cudnn", "cuDNN fused flash attention"),
    ("auto", "cuda", "bfloat16", 60, 4096, "9.0", "xla", "multiple of 8"),
    ("auto", "cuda", "bfloat16", 64, 4095, "9.0", "xla", "even sequence length"),
    ("auto", "rocm", "bfloat16", 64, 4096, None, "xla", "no fused attention kernel on rocm"),
    ("auto", "tpu", "bfloat16", 64, 4096, None, "splash", "Pallas splash attention on TPU"),
    ("auto", "tpu", "float32", 128, 256, None, "splash", "Pallas splash attention on TPU"),
    ("auto", "tpu", "bfloat16", 64, 100, None, "xla", "not a multiple"),
    ("xla", "cuda", "bfloat16", 64, 4096, "9.0", "xla", "as configured"),
    ("cudnn", "cuda", "bfloat16", 64, 4096, "9.0", "cudnn", "as configured"),
    ("splash", "tpu", "bfloat16", 64, 4096, None, "splash", "as configured"),
]


@pytest.mark.parametrize("requested,platform,dtype,head_dim,seq_len,cap,expected,words", TABLE)
def test_selection_table(requested, platform, dtype, head_dim, seq_len, cap, expected, words):
  choice = attention_plan.select(requested, platform=platform, dtype=dtype, head_dim=head_dim,
                                 seq_len=seq_len, compute_capability=cap)
  assert choice.implementation == expected
  assert words in choice.reason
  # The message names the kernel and, for a kernel with a length rule, the rule itself.
  rule = (expected if choice.length_multiple == 1 or expected == "xla" else
          f"{expected} for lengths that are a multiple of {choice.length_multiple}, else xla"
          if requested == "auto" else f"{expected} (lengths must be a multiple of {choice.length_multiple})")
  assert choice.message().startswith(f"attention: {rule} ({requested}: ")


def test_odd_prompt_prefill_keeps_cudnn_without_a_segment_mask():
  choice = attention_plan.select("auto", platform="cuda", dtype="bfloat16", head_dim=64, seq_len=37,
                                 compute_capability="9.0", segments=False)
  assert choice.implementation == "cudnn"


@pytest.mark.parametrize("requested,platform,dtype,words", [
    ("cudnn", "cpu", "bfloat16", "only on NVIDIA GPUs, and this is cpu"),
    ("cudnn", "cuda", "float32", "needs bfloat16 or float16"),
    ("splash", "cuda", "bfloat16", "TPU (Pallas Mosaic) kernel"),
    ("flash", "cpu", "float32", "choose one of"),
])
def test_explicit_kernel_that_cannot_run_is_a_config_error(requested, platform, dtype, words):
  with pytest.raises(ValueError, match="model.attention") as err:
    attention_plan.select(requested, platform=platform, dtype=dtype, head_dim=64, seq_len=256)
  assert words in str(err.value)


def test_plan_refuses_cudnn_on_cpu_before_compiling():
  c = get_config()
  c.model.attention = "cudnn"
  c.model.dtype = "bfloat16"
  with pytest.raises(ValueError, match="model.attention='cudnn' cannot run.*--config.model.attention=auto"):
    decide(validate(c), 1, "cpu")
  decided = decide(validate(c), 1, "gpu")  # the cluster dry run for NVIDIA GPUs accepts it
  assert decided.attention.full.implementation == "cudnn"


def test_a_planned_kernel_keeps_its_length_rule():
  """The plan's rule, not a new choice: lengths a kernel cannot tile run XLA under auto, and are an
  error under an explicit kernel."""
  tpu = dict(platform="tpu", dtype="bfloat16", head_dim=64, seq_len=512)
  auto = attention_plan.plan_attention("auto", **tpu)
  assert auto.full.implementation == auto.prefill.implementation == "splash"
  assert auto.prefill.for_length(256) == "splash" and auto.prefill.for_length(48) == "xla"
  assert auto.decode.implementation == "xla" and auto.ring_block is None
  explicit = attention_plan.plan_attention("splash", **tpu)
  with pytest.raises(ValueError, match="cannot run a length of 48"):
    explicit.prefill.for_length(48)
  gpu = attention_plan.plan_attention("auto", platform="cuda", dtype="bfloat16", head_dim=64,
                                      seq_len=4096, compute_capability="9.0")
  assert gpu.prefill.for_length(37) == "xla" and gpu.prefill.for_length(38) == "cudnn"
