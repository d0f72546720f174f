"""Every preset validates, the real-size presets fit their intended meshes, and bad configs fail clearly."""

import dataclasses
import importlib

import jax
import pytest

from configs import keys
from configs.base import base_config
from launch.run import state as ts
from launch.run.config import validate
from launch.run.sections import Config
from launch.run.plan import decide, make_plan
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib

PRESETS = ["smoke", "demo", "bench", "llama_125m", "llama_1b", "llama_8b", "llama_70b"]


def load(name):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates(name):
  cfg = validate(load(name))
  assert cfg.model.num_params() > 0


@pytest.mark.parametrize("name,devices,expected_millions", [
    ("llama_125m", 8, (110, 140)),       # one GPU node
    ("llama_1b", 64, (1100, 1400)),      # e.g. a v5p-128 slice (64 chips)
    ("llama_8b", 256, (7500, 8500)),     # e.g. 32 nodes x 8 GPUs with tensor=8
    ("llama_70b", 256, (70000, 71000)),  # a v5p slice of 256 chips (v5p:8x8x4); Llama 3 70B is 70.6B
])
def test_real_size_presets_fit_their_meshes(name, devices, expected_millions):
  """Shapes and divisibility of every parameter on a mesh this machine does not have (no allocation)."""
  cfg = validate(load(name))
  low, high = expected_millions
  assert low <= cfg.model.num_params() / 1e6 <= high
  shape = decide(cfg, devices, "tpu").mesh_shape.shape  # the plan's checks, for devices not here
  mdef = ts.model_def(cfg.model)
  specs = rules_lib.tree_specs(mdef.logical_names, mdef.abstract_params, shape, rules_lib.get_rules(cfg.mesh.rules))
  assert len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))) == 12 - cfg.model.tie_embeddings


def test_base_config_is_the_declared_defaults():
  # Read straight from the dataclass fields, not through configs.keys.defaults.
  declared = {f.name: {g.name: g.default for g in dataclasses.fields(f.type)}
              if dataclasses.is_dataclass(f.type) else f.default for f in dataclasses.fields(Config)}
  c = base_config()
  assert c.to_dict() == declared
  assert sorted(c) == ["checkpoint", "data", "distill", "mesh", "model", "prune", "seed", "train"]
  assert (c.seed, c.model.vocab_size, c.model.dtype, c.mesh.data, c.data.data_dir, c.prune.method) == (
      0, 2048, "auto", -1, "runs/data", "none")
  assert type(c.model.rope_theta) is float and type(c.train.tensorboard) is bool  # types as declared


SECTIONS = keys.sections(Config)
ENUMS = [(section, k) for section, cls in SECTIONS.items() for k in keys.keys(cls) if k.choices]


@pytest.mark.parametrize("section", SECTIONS)
def test_every_key_is_described_and_defaults_to_one_of_its_choices(section):
  for k in keys.keys(SECTIONS[section]):
    assert k.doc and "\n" not in k.doc
    if k.choices and (section, k.name) != ("model", "dtype"):  # "auto" is resolved before the check
      assert k.default in k.choices, f"{section}.{k.name}"


@pytest.mark.parametrize("section,k", ENUMS, ids=[f"{s}.{k.name}" for s, k in ENUMS])
def test_every_enum_refuses_an_unknown_value_in_one_line(section, k):
  c = load("smoke")
  c[section][k.name] = "bogus"
  with pytest.raises(ValueError) as err:
    validate(c)
  lines = [line.strip() for line in str(err.value).splitlines()]
  assert f"{section}.{k.name}='bogus': choose one of {list(k.choices)}." in lines


def test_unknown_key_names_the_key():
  c = load("smoke")
  c.train.lerning_rate = 1e-3
  with pytest.raises(ValueError, match=r"Unknown config key 'train.lerning_rate'"):
    validate(c)


def test_wrong_type_names_the_key():
  c = load("smoke").to_dict()
  c["train"]["steps"] = "ten"
  with pytest.raises(ValueError, match=r"train.steps='ten'"):
    validate(c)


@pytest.mark.parametrize("section,key,value,message", [
    ("model", "num_kv_heads", 3, "not a multiple of model.num_kv_heads"),
    ("model", "remat", "some", "model.remat='some'"),
    ("data", "seq_len", 512, "exceeds model.max_seq_len"),
    ("train", "grad_accum_steps", 3, "not divisible by train.grad_accum_steps"),
    ("train", "learning_rate", -1.0, "train.learning_rate"),
    ("mesh", "rules", "zero3", "mesh.rules='zero3'"),
    ("data", "tokenizer", "gpt2", "data.tokenizer"),
])
def test_bad_values_are_named(section, key, value, message):
  c = load("smoke")
  c[section][key] = value
  with pytest.raises(ValueError, match=message):
    validate(c)


def test_mesh_that_does_not_fit_devices():
  with pytest.raises(ValueError, match="needs 6 devices but 8 are available"):
    mesh_lib.resolve_mesh_shape({"data": 2, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    mesh_lib.resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  assert mesh_lib.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8)["data"] == 2


def test_batch_not_divisible_by_data_axes():
  c = load("smoke")
  c.train.global_batch_size = 12
  c.mesh.data = 8
  with pytest.raises(ValueError, match="not divisible by mesh.data x mesh.fsdp = 8 x 1"):
    make_plan(validate(c))


def test_heads_not_divisible_by_tensor_axis():
  c = load("smoke")
  c.model.num_heads = 6
  c.model.num_kv_heads = 6
  c.mesh.data = 2
  c.mesh.tensor = 4
  c.mesh.rules = "tp"
  with pytest.raises(ValueError, match=r"'heads', size 6\) cannot be split over mesh.tensor=4"):
    make_plan(validate(c))


def test_offload_remat_rejected_on_cpu():
  c = load("smoke")
  c.model.remat = "offload_qkv_mlp"
  with pytest.raises(ValueError, match="pinned host memory"):
    make_plan(validate(c))
