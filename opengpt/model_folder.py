"""What a transformers model folder (--init_from=DIR in train.py and sample.py) must pass before
transformers reads it. A folder is data from anyone, so:

- it runs no code: a config.json with `auto_map` names Python files in the folder for transformers
  to import (on a terminal it even asks whether to), so such a folder is refused outright; every
  from_pretrained call also passes trust_remote_code=False;
- it cannot make us allocate more than it holds: every size config.json declares is compared with
  the shapes of the tensors in the weight file, read from the file's header, before transformers
  builds the model (n_embd=10**7 with a 1 MB weight file would otherwise allocate 20 GB first).
"""
import json
import math
import os
import re
import stat

import torch

from opengpt.cli import UserError, first_line

# What GPT.from_pretrained reads, and transformers' class for each.
MODEL_CLASSES = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}
CONFIG_BYTES_LIMIT = 1 << 20  # a config.json is a few KB
# A rotary model's positions are held by no tensor, and sample.py preallocates its KV cache for all of
# them: a bound far beyond any model this project trains.
MAX_ROTARY_POSITIONS = 1 << 20
LAYER_INDEX = re.compile(r"(?:^|\.)(?:h|layers)\.(\d+)\.")


def check_model_folder(folder):
    """Refuse, in one line, a folder that would run code or whose config.json declares sizes its
    weights do not hold. Reads config.json and the weight files' headers only."""
    config = read_config(folder)
    if "auto_map" in config:
        raise UserError(f"--init_from={folder}: its config.json asks to run Python code from the folder "
                        f"(auto_map {str(config['auto_map'])[:80]}); this project never runs code from a model "
                        f"folder: use a GPT-2 or GPT-NeoX folder without auto_map (export.py writes one)")
    model_type = config.get("model_type")
    if model_type not in MODEL_CLASSES:
        raise UserError(f"{folder} is not a GPT-2 model (config.json's model_type is {model_type!r}; "
                        f"GPT-2 and GPT-NeoX folders load)")
    check_declared_sizes(folder, config, weight_shapes(folder))


def read_config(folder):
    path = os.path.join(folder, "config.json")
    check_regular_file(path, "config.json", CONFIG_BYTES_LIMIT)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable JSON config ({type(e).__name__}); not a transformers model folder") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a JSON {type(config).__name__}, not a model config")
    return config


def check_regular_file(path, what, limit=None):
    """A file we may read whole: it exists, is a regular file (not a device or a pipe that never
    ends), and is not larger than limit bytes."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{os.path.dirname(path) or '.'} has no {what}: not a transformers model folder") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path} is not a regular file (a device, a pipe or a folder); give a transformers model folder")
    if limit is not None and info.st_size > limit:
        raise UserError(f"{path} is {info.st_size:,} bytes, far more than a {what} holds; the folder is damaged or not a model")


def weight_shapes(folder):
    """{tensor name: shape} of the folder's weights, read from the files' headers without loading a
    tensor; the files in transformers' order: model.safetensors, its sharded index, pytorch_model.bin."""
    single = os.path.join(folder, "model.safetensors")
    index = single + ".index.json"
    if os.path.lexists(single):
        return safetensors_shapes([single])
    if os.path.lexists(index):
        check_regular_file(index, "model.safetensors.index.json", CONFIG_BYTES_LIMIT)
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is not a safetensors index ({type(e).__name__}); the folder is damaged") from None
        return safetensors_shapes([os.path.join(folder, str(shard)) for shard in shards])
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.lexists(binary):
        return torch_file_shapes(binary)
    raise UserError(f"{folder} holds no weights (model.safetensors or pytorch_model.bin); not a transformers model folder")


def safetensors_shapes(paths):
    from safetensors import safe_open

    shapes = {}
    for path in paths:
        check_regular_file(path, os.path.basename(path))
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as e:  # SafetensorError (Rust) for a truncated or foreign file, OSError
            raise UserError(f"could not load GPT-2 weights {os.path.dirname(path)!r}: {os.path.basename(path)} "
                            f"is not a safetensors weights file ({first_line(e)})") from None
    return shapes


def torch_file_shapes(path):
    """Shapes in a pytorch_model.bin, its tensors mapped to the meta device (nothing allocated), and
    weights_only: a pickle that needs code to load is refused, not run."""
    check_regular_file(path, os.path.basename(path))
    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except Exception as e:  # UnpicklingError, a zip reader's RuntimeError, EOFError, ...
        raise UserError(f"could not load GPT-2 weights {os.path.dirname(path)!r}: {os.path.basename(path)} "
                        f"is not a weights file ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"{path} is not a weights file (it holds a {type(state).__name__}, not named tensors)")
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def check_declared_sizes(folder, config, shapes):
    """Every parameter of the model config.json describes is in the weights, with the same shape.
    The layer count is compared first, so that the model described is only ever built on the meta
    device (shapes, no memory) when its size is that of the weights."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its notes on the config are the from_pretrained's to come
    try:
        hf_config = transformers.AutoConfig.for_model(**config)
        layers = hf_config.num_hidden_layers
    except Exception as e:  # transformers' strict dataclasses: a string for a size, say
        raise UserError(f"{folder}/config.json does not describe a {config['model_type']} model ({first_line(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    held = {int(m.group(1)) for name in shapes for m in [LAYER_INDEX.search(name)] if m}
    if layers != len(held):
        raise UserError(f"{folder}/config.json declares {layers} layers but its weights hold {len(held)}; the folder is damaged")
    positions = getattr(hf_config, "max_position_embeddings", None)
    if config["model_type"] == "gpt_neox" and not (isinstance(positions, int) and 0 < positions <= MAX_ROTARY_POSITIONS):
        raise UserError(f"{folder}/config.json declares max_position_embeddings={positions!r}; "
                        f"at most {MAX_ROTARY_POSITIONS:,} positions load")
    try:
        with torch.device("meta"):
            model = getattr(transformers, MODEL_CLASSES[config["model_type"]])(hf_config)
    except Exception as e:
        raise UserError(f"{folder}/config.json does not describe a {config['model_type']} model ({first_line(e)})") from None
    # By name where the names agree (GPT-2's own files lack the prefix); transformers also renames some
    # on loading (GPT-NeoX's embed_out is its lm_head), so in total as well: what the model would
    # allocate must be held by the weights, whatever their names.
    prefix = model.base_model_prefix + "."
    held_shapes = {name.removeprefix(prefix): shape for name, shape in shapes.items()}
    missing = []
    for name, param in model.named_parameters():  # a tied head is listed once, as the embedding
        shape = held_shapes.get(name.removeprefix(prefix))
        if shape is None:
            missing.append(name)
        elif shape != tuple(param.shape):
            raise UserError(f"{folder}/config.json declares sizes its weights do not hold: {name} would be "
                            f"{tuple(param.shape)}, the weight file has {shape}; the folder is damaged or was edited")
    wanted = sum(param.numel() for param in model.parameters())
    held_values = sum(math.prod(shape) for shape in shapes.values())
    if wanted > held_values:
        raise UserError(f"{folder}: weights missing for {missing[:3]} (config.json declares {wanted:,} values, the "
                        f"weights hold {held_values:,}); the folder is damaged or incomplete")
