"""ministd.weights: the one way every network is saved, read and loaded.

What is checked: a save_model/load_model pair gives back the same network (values exactly,
in every dtype asked); tensors are read once into the dtype asked (equal to reading then
casting, bit for bit); sharded folders (``*.safetensors.index.json``) read as one; a network
built on the meta device takes the file's tensors as its parameters (nothing left on meta,
nothing random); a file that does not fit raises WeightsMismatchError naming the keys and
loads nothing; bad files are named in the error.
"""

import json

import pytest
import torch
from torch import nn

from ministd import unet as U
from ministd.weights import (WeightsMismatchError, build_on_meta, load_model, load_strict, read_safetensors,
                             read_weights, save_model, weight_files, write_safetensors)

pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.width = width
        self.linear = nn.Linear(width, 3)
        self.norm = nn.GroupNorm(2, width)
        self.register_buffer("steps", torch.arange(5))        # an integer buffer: never cast


def random_tiny(width: int = 4, seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny(width)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_model_and_load_model_round_trip(tmp_path, dtype):
    model = random_tiny()
    save_model(model, tmp_path / "tiny.safetensors", {"width": 4}, dtype=None,
               extra_config={"_note": "kept in the JSON, not given to build"})
    config = json.loads((tmp_path / "tiny.json").read_text())
    assert config == {"width": 4, "_note": "kept in the JSON, not given to build"}
    seen = []
    back = load_model(tmp_path / "tiny.safetensors", lambda fields: seen.append(fields) or Tiny(**fields), dtype=dtype)
    assert seen == [{"width": 4}]
    assert not back.training
    assert back.linear.weight.dtype == dtype and back.steps.dtype == torch.int64
    for key, value in model.state_dict().items():
        expected = value.to(dtype) if value.is_floating_point() else value
        assert torch.equal(back.state_dict()[key], expected), key


def test_save_model_writes_float16_by_default(tmp_path):
    save_model(random_tiny(), tmp_path / "t.safetensors", {"width": 4})
    assert read_safetensors(tmp_path / "t.safetensors")["linear.weight"].dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_read_safetensors_converts_each_tensor_once_exactly(tmp_path, dtype):
    tensors = {"a": torch.randn(7, 3), "b": torch.randn(2, 2, 2).half(), "ids": torch.arange(4), "empty": torch.ones(0, 3)}
    write_safetensors(tmp_path / "f.safetensors", tensors)
    got = read_safetensors(tmp_path / "f.safetensors", dtype=dtype)
    for key, value in tensors.items():
        expected = value.to(dtype) if value.is_floating_point() else value
        assert got[key].dtype == expected.dtype and torch.equal(got[key], expected), key
    assert list(read_safetensors(tmp_path / "f.safetensors", keys=["b"])) == ["b"]
    with pytest.raises(KeyError, match="has no tensors"):
        read_safetensors(tmp_path / "f.safetensors", keys=["nope"])


def test_sharded_folder_reads_as_one(tmp_path):
    """diffusers and transformers split large models into shards listed by an index file."""
    model = U.UNet(U.shapes_tiny()).eval()
    state = model.state_dict()
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    for name, part in shards.items():
        write_safetensors(tmp_path / name, {k: state[k] for k in part})
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_diffusers_config()))
    assert [p.name for p in weight_files(tmp_path, "diffusion_pytorch_model")] == sorted(shards)
    assert read_weights(tmp_path, "diffusion_pytorch_model").keys() == state.keys()
    loaded = U.UNet.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16)), key
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="has no 'weight_map'"):
        weight_files(tmp_path, "diffusion_pytorch_model")


def test_meta_built_network_takes_the_tensors_themselves():
    """No random initialisation and no copy: the loaded parameters are the tensors handed over."""
    source = random_tiny(seed=3)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    model = build_on_meta(lambda: Tiny(4))
    assert all(p.is_meta for p in model.parameters())
    load_strict(model, state, source="test")
    assert model.linear.weight.data_ptr() == state["linear.weight"].data_ptr()
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert isinstance(model.linear.weight, nn.Parameter) and model.linear.weight.requires_grad


def test_a_file_that_does_not_fit_loads_nothing(tmp_path):
    model = random_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = dict(random_tiny(width=6, seed=1).state_dict())     # every shape differs
    state["extra.weight"] = torch.zeros(1)
    del state["norm.bias"]
    with pytest.raises(WeightsMismatchError) as err:
        load_strict(model, state, source="wide.safetensors")
    message = str(err.value)
    for part in ("wide.safetensors", "missing keys (1)", "norm.bias", "unexpected keys (1)", "extra.weight",
                 "linear.weight: file has (3, 6), model expects (3, 4)"):
        assert part in message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    meta = build_on_meta(lambda: Tiny(4))
    with pytest.raises(WeightsMismatchError):
        load_strict(meta, state, source="wide.safetensors")
    assert all(p.is_meta for p in meta.parameters())


def test_bad_files_are_named(tmp_path):
    (tmp_path / "text.safetensors").write_text("not tensors at all")
    with pytest.raises(ValueError, match=r"text\.safetensors: not a safetensors file \(it starts with text"):
        read_safetensors(tmp_path / "text.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.safetensors: empty file"):
        load_model(tmp_path / "empty.safetensors", lambda fields: Tiny())
    with pytest.raises(FileNotFoundError, match="no weights file at"):
        read_safetensors(tmp_path / "absent.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02")
    with pytest.raises(ValueError, match="pickled .ckpt/.bin files are not loaded"):
        read_safetensors(tmp_path / "model.ckpt")
    save_model(random_tiny(), tmp_path / "ok.safetensors", {"width": 4})
    (tmp_path / "ok.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"ok\.json is not valid JSON"):
        load_model(tmp_path / "ok.safetensors", lambda fields: Tiny(**fields))
