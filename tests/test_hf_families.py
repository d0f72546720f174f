"""Hugging Face families beyond plain Llama, and what travels with a checkpoint (issue 14).

Rope scaling (llama3, linear) must matter on the fixtures; both rope spellings are read; the chat
template renders to the ids transformers' apply_chat_template gave (saved in the fixtures' chat.json by
tests/fixtures/make_hf_llama_fixture.py); generation stops at end-of-turn tokens; the converted
tokenizer is used by default (generate, fine-tune, export); q/k/v biases survive int8 quantization;
a truncated shard and a missing directory are named. The golden-logit tests of every family (1 and
8 devices) are in test_convert.py.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from compress import quantize
from launch.huggingface import checkpoint as hf_lib
from launch.huggingface import convert
from launch.run import state as ts
from launch.run.config import model_config
from launch.run.restore import load_checkpoint, read_saved_config
from lm.attention_plan import unplanned
from lm.data.chat import ChatFormat, chat_format
from lm.data.tokenizer import HuggingFaceTokenizer
from lm.decoding import make_generate_fn
from test_convert import FIXTURES, finetune_config, fixture_config, imported_logits
from launch.run.loop import train


@pytest.mark.parametrize("name", ["hf_llama3_rope", "hf_llama_linear_rope"])
def test_rope_scaling_changes_the_logits(name):
  """Without the scaling the same weights miss transformers' logits by far more than 1e-4."""
  cfg = fixture_config(name)
  assert cfg.rope_scaling == {"hf_llama3_rope": "llama3", "hf_llama_linear_rope": "linear"}[name]
  mdef = ts.model_def(dataclasses.replace(cfg, rope_scaling="none"), None, unplanned(cfg.attention))
  _, params, golden = imported_logits(name, {"data": 1, "fsdp": 1, "tensor": 1}, "dp")
  unscaled = np.asarray(jax.jit(lambda p, t: mdef.bind(p)(t))(params, golden["tokens"]))
  assert np.abs(unscaled - golden["logits"]).max() > 0.1


def test_both_rope_spellings_are_read():
  """transformers 4 wrote rope_theta + rope_scaling ("type" or "rope_type"); 5 writes rope_parameters."""
  v5 = hf_lib.read_hf_config(os.path.join(FIXTURES, "hf_llama3_rope"))
  params = dict(v5["rope_parameters"])
  v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
  v4["rope_theta"] = params.pop("rope_theta")
  v4["rope_scaling"] = {**{k: v for k, v in params.items() if k != "rope_type"}, "type": "llama3"}
  both = {**v4, "rope_parameters": v5["rope_parameters"]}  # agreeing: accepted
  fields = hf_lib.model_fields_from_hf(v5)
  assert hf_lib.model_fields_from_hf(v4) == fields == hf_lib.model_fields_from_hf(both)
  assert (fields["rope_scaling"], fields["rope_factor"], fields["rope_original_max_len"]) == ("llama3", 8.0, 32)


@pytest.mark.parametrize("name", ["hf_llama3_rope", "hf_qwen2"])
def test_chat_template_ids_match_transformers(name):
  directory = os.path.join(FIXTURES, name)
  tokenizer = HuggingFaceTokenizer.from_file(os.path.join(directory, "tokenizer.json"))
  chat = ChatFormat.from_directory(directory, tokenizer)
  with open(os.path.join(directory, "chat.json")) as fh:
    cases = json.load(fh)
  for case in cases:
    assert chat.render(case["messages"], case["add_generation_prompt"]) == case["text"]
    assert chat.encode(tokenizer, case["messages"], case["add_generation_prompt"]) == case["ids"]
  with open(os.path.join(directory, "generation_config.json")) as fh:
    eos = json.load(fh)["eos_token_id"]
  assert set(chat.stop_ids) == {tokenizer.eos_id, *([eos] if isinstance(eos, int) else eos)}


def test_chat_needs_a_template(tmp_path):
  with pytest.raises(ValueError, match="data.tokenizer='sentencepiece'"):
    chat_format("sentencepiece", "", None)
  for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(FIXTURES, "hf_llama3_rope", f), tmp_path / f)
  tokenizer = HuggingFaceTokenizer.from_file(tmp_path / "tokenizer.json")
  with pytest.raises(ValueError, match="has no chat template"):
    chat_format("huggingface", str(tmp_path / "tokenizer.json"), tokenizer)


@pytest.fixture(scope="module")
def converted_llama3(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("llama3") / "converted")
  convert.import_hf(os.path.join(FIXTURES, "hf_llama3_rope"), out)
  return out


def test_generate_uses_the_converted_tokenizer_and_stops_at_end_of_turn(converted_llama3):
  loaded = load_checkpoint(converted_llama3, devices=jax.devices()[:1],
                           overrides={"mesh.num_devices": 1, "train.global_batch_size": 1})
  assert loaded.cfg.data.tokenizer == "huggingface"
  assert loaded.cfg.data.tokenizer_path.startswith(converted_llama3)
  assert isinstance(loaded.tokenizer, HuggingFaceTokenizer) and loaded.tokenizer.vocab_size == 128
  chat = chat_format(loaded.cfg.data.tokenizer, loaded.cfg.data.tokenizer_path, loaded.tokenizer)
  prompt = chat.render([{"role": "user", "content": "What is the weather like today?"}])
  ids = loaded.tokenizer.encode(prompt)
  # Greedy tokens with no stop but EOS, then the same with the third new token declared end-of-turn.
  fn = make_generate_fn(loaded.plan.mdef.graphdef, max_new_tokens=6, temperature=0.0)
  free_ids = [int(t) for t in np.asarray(fn(loaded.params, np.asarray([ids], np.int32), jax.random.key(0)))[0, len(ids):]]
  stop = free_ids[2]
  assert stop not in free_ids[:2] + list(chat.stop_ids), "pick another fixture position: no clean stop"
  stopped = loaded.generate([prompt], max_new_tokens=6, temperature=0.0, echo=False, stop_ids=(stop,))[0]
  assert stopped == loaded.tokenizer.decode(free_ids[:2])
  assert loaded.generate([prompt], max_new_tokens=6, temperature=0.0, echo=False)[0].startswith(stopped)


def test_fine_tune_and_export_keep_the_converted_tokenizer(converted_llama3, tmp_path):
  """train.init_checkpoint with the default tokenizer settings reads text with the converted one; the
  fine-tuned run's export carries the tokenizer files."""
  saved, _ = read_saved_config(converted_llama3)
  fields = {k: getattr(saved.model, k) for k in convert.WEIGHT_FIELDS + ("max_seq_len",)}
  raw = finetune_config(str(tmp_path / "data"), converted_llama3, fields)
  cfg = dataclasses.replace(raw, data=dataclasses.replace(raw.data, tokenizer="sentencepiece"),
                            train=dataclasses.replace(raw.train, steps=1))
  result = train(cfg, str(tmp_path / "run"))
  assert result.final_step == 1
  exported = str(tmp_path / "hf")
  files = convert.export_hf(result.checkpoint_dir, exported)
  assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(files)
  assert hf_lib.read_hf_config(exported)["rope_parameters"]["rope_type"] == "llama3"


def test_qkv_bias_survives_int8_quantization():
  _, params, golden = imported_logits("hf_qwen2", {"data": 1, "fsdp": 1, "tensor": 1}, "dp")
  cfg = fixture_config("hf_qwen2")
  qcfg = quantize.quantized_config(cfg, "w8a16")
  qparams = jax.jit(lambda p: quantize.quantize_params(p, qcfg))(params)
  for proj in ("query", "key", "value"):
    np.testing.assert_array_equal(np.asarray(qparams["blocks"]["attention"][proj]["bias"]),
                                  np.asarray(params["blocks"]["attention"][proj]["bias"]))
  qdef = ts.model_def(qcfg, None, unplanned(qcfg.attention))
  qlogits = np.asarray(jax.jit(lambda p, t: qdef.bind(p)(t))(qparams, golden["tokens"]))
  # int8 weights: close to the float logits (scale ~1.4), and far closer than without the biases.
  err = np.abs(qlogits - golden["logits"]).max()
  no_bias = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 if getattr(path[-1], "key", None) == "bias" else x, qparams)
  err_no_bias = np.abs(np.asarray(jax.jit(lambda p, t: qdef.bind(p)(t))(no_bias, golden["tokens"]))
                       - golden["logits"]).max()
  print(f"int8 max error {err:.3f}, without the biases {err_no_bias:.3f}")
  assert err < 0.5 and 3 * err < err_no_bias


def test_truncated_shard_is_named(tmp_path):
  directory = str(tmp_path / "hf")
  shutil.copytree(os.path.join(FIXTURES, "hf_mistral"), directory)
  shard = os.path.join(directory, "model-00003-of-00007.safetensors")
  with open(shard, "rb") as fh:
    data = fh.read()
  with open(shard, "wb") as fh:
    fh.write(data[:len(data) // 2])
  with pytest.raises(hf_lib.HfConfigError, match=r"model-00003-of-00007.safetensors \(file 3 of 7, "
                     r"\d+ bytes\) cannot be read as safetensors.*truncated or corrupt; download it again"):
    convert.import_hf(directory, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_missing_directory_is_reported_as_missing(tmp_path):
  with pytest.raises(hf_lib.HfConfigError, match="does not exist"):
    convert.import_hf(str(tmp_path / "nope"), str(tmp_path / "out"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(hf_lib.HfConfigError, match="has no config.json"):
    convert.import_hf(str(tmp_path / "empty"), str(tmp_path / "out"))


def test_export_without_an_imported_config_picks_the_family():
  """A model with q/k/v biases can only be a Qwen2; rope scaling is written in both spellings."""
  cfg = model_config(qkv_bias=True, rope_scaling="linear", rope_factor=2.0)
  hf = hf_lib.hf_config_from_model(cfg, "float32")
  assert (hf["architectures"], hf["model_type"], hf["use_sliding_window"]) == (["Qwen2ForCausalLM"], "qwen2", False)
  assert hf["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
  assert hf["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": cfg.rope_theta}
  assert hf_lib.model_fields_from_hf(hf)["rope_factor"] == 2.0
  plain = hf_lib.hf_config_from_model(model_config(), "float32")
  assert (plain["model_type"], plain["rope_scaling"]) == ("llama", None)


def test_a_moved_converted_checkpoint_finds_its_tokenizer(tmp_path):
  """The saved tokenizer path is absolute; after a move the copy inside the checkpoint is used."""
  written, moved = str(tmp_path / "written"), str(tmp_path / "moved")
  convert.import_hf(os.path.join(FIXTURES, "hf_llama3_rope"), written)
  saved_path = read_saved_config(written)[0].data.tokenizer_path
  assert saved_path == os.path.join(written, "tokenizer", "tokenizer.json")
  tokenizer_bytes = open(saved_path, "rb").read()
  os.rename(written, moved)
  cfg, _ = read_saved_config(moved)
  assert cfg.data.tokenizer_path == os.path.join(moved, "tokenizer", "tokenizer.json")
  assert open(cfg.data.tokenizer_path, "rb").read() == tokenizer_bytes
