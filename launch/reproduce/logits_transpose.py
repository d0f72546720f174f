"""Does computing the tied embedding's gradient without the logits-gradient transpose speed up the step?

The experiment behind docs/speed.md's "Why 1.25x is out of reach on this CPU": XLA:CPU's matmul for
the tied table's gradient (dlogits^T . h) copies the whole [B*L, V] float32 logits gradient into the
other order first. This script trains the bench preset's step twice in one process, with the
model's autodiff projection ("autodiff") and with a custom VJP that computes the gradient as
(h^T . dlogits)^T behind an optimization barrier ("no transpose"), alternating one step of each per
round (`timing.time_interleaved`), and reports the median per-round ratio. The custom VJP lives here
only: it was measured, not adopted.

  python -m launch.reproduce.logits_transpose --rounds 6 --out docs/results/bench
"""

import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from configs.bench import get_config
from launch.measure import timing
from launch.measure.tables import write_table
from launch.run.config import validate, with_overrides
from launch.run.plan import make_plan
from lm import layers

flags.DEFINE_integer("rounds", 6, "Alternating rounds (one step of each variant per round).")
flags.DEFINE_string("dtype", "float32", "Compute dtype of the bench preset.")
flags.DEFINE_string("out", None, "Write logits_transpose.{md,csv} here.")
FLAGS = flags.FLAGS


@jax.custom_vjp
def _logits_without_transpose(x_BxLxD, table_VxD):
  return jnp.einsum("bld,vd->blv", x_BxLxD, table_VxD, preferred_element_type=jnp.float32)


def _fwd(x_BxLxD, table_VxD):
  return _logits_without_transpose(x_BxLxD, table_VxD), (x_BxLxD, table_VxD)


def _bwd(residuals, dlogits_BxLxV):
  x_BxLxD, table_VxD = residuals
  dx = jnp.einsum("blv,vd->bld", dlogits_BxLxV.astype(table_VxD.dtype), table_VxD,
                  preferred_element_type=jnp.float32)
  dtable_DxV = jnp.einsum("bld,blv->dv", x_BxLxD, dlogits_BxLxV.astype(x_BxLxD.dtype),
                          preferred_element_type=jnp.float32)
  # Without the barrier XLA folds the transpose back into the matmul (swapping its operands).
  dtable_DxV = jax.lax.optimization_barrier(dtable_DxV)
  return dx.astype(x_BxLxD.dtype), dtable_DxV.T.astype(table_VxD.dtype)


_logits_without_transpose.defvjp(_fwd, _bwd)


def _attend_without_transpose(self, x_BxLxD):
  return _logits_without_transpose(x_BxLxD.astype(self.dtype), self.table[...].astype(self.dtype))


def main(argv):
  del argv
  runners = {}
  autodiff_attend = layers.Embedding.attend
  try:
    for name, attend in (("autodiff", autodiff_attend), ("no transpose", _attend_without_transpose)):
      layers.Embedding.attend = attend  # read when the step is traced: at its first call below
      plan = make_plan(validate(with_overrides(get_config(), {"model.dtype": FLAGS.dtype})))
      runners[name] = timing.train_step_runner(plan)
      runners[name]()
  finally:
    layers.Embedding.attend = autodiff_attend
  times = timing.time_interleaved(runners, rounds=FLAGS.rounds, warmup=1)
  ratios = [a / b for a, b in zip(times["autodiff"], times["no transpose"])]
  rows = [{"round": i + 1, "autodiff_ms": 1e3 * a, "no_transpose_ms": 1e3 * b, "speedup": r}
          for i, (a, b, r) in enumerate(zip(times["autodiff"], times["no transpose"], ratios))]
  speedup = timing.median_ratio(times["autodiff"], times["no transpose"])
  print(f"device: {jax.devices()[0].device_kind} x1, {FLAGS.dtype}; median speedup {speedup:.3f}x "
        f"(autodiff / no transpose, per round)")
  for row in rows:
    print(f"round {row['round']}: {row['autodiff_ms']:.0f} ms vs {row['no_transpose_ms']:.0f} ms, "
          f"{row['speedup']:.2f}x")
  if FLAGS.out:
    write_table(rows, FLAGS.out, "logits_transpose",
                "Tied-embedding gradient without the logits-gradient transpose (bench preset)",
                "python -m launch.reproduce.logits_transpose " + " ".join(sys.argv[1:]),
                notes=f"Median per-round speedup: {speedup:.3f}x on {jax.devices()[0].device_kind}.")


if __name__ == "__main__":
  app.run(main)
