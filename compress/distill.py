"""Knowledge distillation: the loss, and the training loss that runs a frozen teacher in the same step.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, tokens)
           [+ hidden_weight * mean squared error of the final hidden states, for students as wide as the teacher]

T^2 keeps the soft term's gradient on the scale of the hard term's as T grows (Hinton et al., 2015).
Everything is float32 and summed over tokens (divided once by the token count), like lm.loss.
"""

import jax
import jax.numpy as jnp

from lm.loss import cross_entropy


def kd_loss_sums(student_logits_BxLxV: jax.Array, teacher_logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                 *, alpha: float, temperature: float,
                 weights_BxL: jax.Array | None = None) -> dict[str, jax.Array]:
  """Returns float32 sums over tokens: {"loss", "kl", "ce", "tokens"}.

  `kl` is the plain sum of KL(p_teacher,T || p_student,T) per token; `loss` = alpha * T^2 * kl +
  (1 - alpha) * ce. The teacher's logits are treated as constants (no gradient flows into them).
  `weights_BxL` (0 on an instruction's prompt tokens) weighs each position's KL and CE alike.
  """
  t = jnp.float32(temperature)
  # Softmax of both in float32: the soft targets' small probabilities are what carries the knowledge.
  log_q_BxLxV = jax.nn.log_softmax(student_logits_BxLxV.astype(jnp.float32) / t, axis=-1)
  log_p_BxLxV = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits_BxLxV).astype(jnp.float32) / t,
                                   axis=-1)
  kl_BxL = jnp.sum(jnp.exp(log_p_BxLxV) * (log_p_BxLxV - log_q_BxLxV), axis=-1)
  ce_sum, tokens = cross_entropy(student_logits_BxLxV, targets_BxL, weights_BxL)
  kl_sum = jnp.sum(kl_BxL if weights_BxL is None else kl_BxL * weights_BxL.astype(jnp.float32))
  loss_sum = alpha * t * t * kl_sum + (1.0 - alpha) * ce_sum
  return {"loss": loss_sum, "kl": kl_sum, "ce": ce_sum, "tokens": tokens}


def hidden_mse_sum(student_BxLxD: jax.Array, teacher_BxLxD: jax.Array) -> jax.Array:
  """Sum over tokens of the mean (over D) squared difference of two final hidden states; float32."""
  diff = student_BxLxD.astype(jnp.float32) - jax.lax.stop_gradient(teacher_BxLxD).astype(jnp.float32)
  return jnp.sum(jnp.mean(diff * diff, axis=-1))


def distill_loss(params, batch, teacher_params, *, student, teacher, alpha: float, temperature: float,
                 hidden_weight: float):
  """A LossHook function: (student params, batch, teacher params) -> (mean loss, (loss_sum, tokens)).

  `student` and `teacher` are ModelDefs (anything with `.bind(params)` returning a Transformer).
  The teacher's forward runs inside the same jitted step as the student's, with its parameters an
  argument of that step (sharded by the same rule table), and receives no gradient. Both see the
  batch's segment ids (packed documents kept apart, as in training) and its loss weights.
  """
  inputs_BxL, segment_ids_BxL = batch["inputs"], batch.get("segment_ids")
  teacher_model = teacher.bind(jax.lax.stop_gradient(teacher_params))
  teacher_hidden_BxLxD, _ = teacher_model.hidden_states(inputs_BxL, segment_ids_BxL=segment_ids_BxL)
  teacher_logits_BxLxV = teacher_model.logits(teacher_hidden_BxLxD)
  student_model = student.bind(params)
  student_hidden_BxLxD, _ = student_model.hidden_states(inputs_BxL, segment_ids_BxL=segment_ids_BxL)
  student_logits_BxLxV = student_model.logits(student_hidden_BxLxD)
  weights_BxL = batch.get("loss_weights")
  sums = kd_loss_sums(student_logits_BxLxV, teacher_logits_BxLxV, batch["targets"],
                      alpha=alpha, temperature=temperature, weights_BxL=weights_BxL)
  loss_sum = sums["loss"]
  if hidden_weight:
    mse_BxLxD = (student_hidden_BxLxD, teacher_hidden_BxLxD)
    if weights_BxL is not None:
      mse_BxLxD = tuple(h * weights_BxL[..., None].astype(h.dtype) for h in mse_BxLxD)
    loss_sum = loss_sum + hidden_weight * hidden_mse_sum(*mse_BxLxD)
  return loss_sum / sums["tokens"], (loss_sum, sums["tokens"])


def check_teacher_fits(student_cfg, teacher_cfg, distill_cfg) -> None:
  """Raises ValueError if the teacher cannot teach this student (ModelConfigs and the DistillConfig)."""
  if teacher_cfg.vocab_size != student_cfg.vocab_size:
    raise ValueError(
        f"The teacher has model.vocab_size={teacher_cfg.vocab_size} but the student has "
        f"model.vocab_size={student_cfg.vocab_size}; distillation compares distributions over the same "
        f"tokens, so set the student's model.vocab_size={teacher_cfg.vocab_size} and use the teacher's "
        "tokenizer.")
  if distill_cfg.hidden_weight and teacher_cfg.d_model != student_cfg.d_model:
    raise ValueError(
        f"distill.hidden_weight={distill_cfg.hidden_weight} matches hidden states, which needs the same "
        f"width, but teacher d_model={teacher_cfg.d_model} and student d_model={student_cfg.d_model}; "
        "set distill.hidden_weight=0 or make the student as wide as the teacher.")
