"""Adapter files in PEFT's format and training checkpoints: PEFT loads ours and we load PEFT's,
bad files are clear errors that leave the model unchanged, saves survive being killed midway,
and a resumed run continues bit for bit."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

from fusedlora import (AdapterFileError, LoRALinear, apply_lora, load_adapter, load_training_state, save_adapter,
                       save_training_state)
from fusedlora.adapters import CONFIG_NAME, WEIGHTS_NAME

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(32, 64)
        self.act = nn.GELU()
        self.blocks = nn.ModuleList([nn.Linear(64, 64) for _ in range(2)])
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        x = self.act(self.up(x))
        for block in self.blocks:
            x = x + self.act(block(x))
        return self.head(x)


def _adapted(seed=1, **kwargs):
    model = apply_lora(Net(), ["up", "blocks.0", "blocks.1"], r=4, alpha=8, quant="dense",
                       rank_pattern={"blocks.1": 6}, alpha_pattern={"up": 3}, **kwargs)
    torch.manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B.weight, std=0.2)
            nn.init.normal_(layer.lora_A.weight, std=0.2)
    return model.eval()


def _adapter_params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def test_peft_loads_what_we_save(tmp_path):
    model = _adapted()
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="local/net")
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["rank_pattern"] == {"blocks.1": 6}
    assert config["alpha_pattern"] == {"up": 3} and config["base_model_name_or_path"] == "local/net"
    peft_model = peft.PeftModel.from_pretrained(Net(), tmp_path / "adapter").eval()
    x = torch.randn(5, 32)
    torch.testing.assert_close(peft_model(x), model(x), atol=1e-5, rtol=1e-5)


def test_load_adapter_keeps_the_base_as_it_is_unless_told_and_says_which(tmp_path, caplog):
    """A PEFT adapter (no format recorded) goes onto the base as it is, as PEFT runs it, with a
    warning; one that fusedlora saved goes onto each layer's format, blocksize and nesting;
    `quant` chooses; a bad `quant` is named as such."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "0", "1"], init_lora_weights=False)
    peft_model = peft.get_peft_model(Net(), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    x = torch.randn(5, 32)
    with caplog.at_level("INFO", logger="fusedlora"), pytest.warns(UserWarning, match="records no base format"):
        fresh = load_adapter(Net(), tmp_path / "peft").eval()
    assert {layer.weight.fmt for layer in (fresh.up, *fresh.blocks)} == {"dense"}
    assert "frozen weights in dense (as they are)" in caplog.text
    torch.testing.assert_close(fresh(x), peft_model(x), atol=1e-5, rtol=1e-5)
    mixed = apply_lora(apply_lora(Net(), ["up"], r=4, quant="nf4", blocksize=128, double_quant=False),
                       ["blocks.0"], r=4, quant="int8")
    save_adapter(mixed, tmp_path / "nf4")
    caplog.clear()
    with caplog.at_level("INFO", logger="fusedlora"), warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = load_adapter(Net(), tmp_path / "nf4")
    assert restored.up.weight.describe() == "nf4(blocksize=128)" and restored.blocks[0].weight.fmt == "int8"
    assert not isinstance(restored.blocks[1], LoRALinear)
    assert "in the formats the adapter was trained over: ['int8', 'nf4']" in caplog.text
    assert load_adapter(Net(), tmp_path / "nf4", quant="int8").up.weight.fmt == "int8"
    assert load_adapter(Net(), tmp_path / "nf4", quant=None).up.weight.fmt == "dense"
    for bad in ("nf5", "auto "):
        with pytest.raises(ValueError, match=f"quant must be one of .* got {bad!r}"):
            load_adapter(Net(), tmp_path / "nf4", quant=bad)
    with pytest.raises(ValueError, match="quant must be one of .* got 'q4'"):
        apply_lora(Net(), ["up"], quant="q4")
    with pytest.raises(ValueError, match="quant must be one of .* got 'q4'"):
        LoRALinear.from_linear(nn.Linear(8, 8), quant="q4")


@pytest.mark.parametrize("record", [{"up": {"quant": "nf4", "blocksize": 48, "double_quant": True}},
                                    {"up": {"quant": "nf4", "blocksize": 64, "double_quant": True, "extra": 1}},
                                    {"up": {"quant": "q4", "blocksize": 64, "double_quant": True}},
                                    {}, [1], "nf4"])
def test_a_bad_format_record_is_a_clear_error_and_changes_nothing(tmp_path, record):
    from fusedlora.adapters import BASE_FORMAT_KEY
    from fusedlora.safefiles import read_safetensors, write_safetensors

    save_adapter(apply_lora(Net(), ["up", "blocks.0"], r=4, quant="int8"), tmp_path / "a")
    tensors, _ = read_safetensors(tmp_path / "a" / WEIGHTS_NAME)
    entries = record if not isinstance(record, dict) or not record else {
        "blocks.0": {"quant": "int8", "blocksize": 64, "double_quant": True}, **record}
    write_safetensors(tensors, tmp_path / "a" / WEIGHTS_NAME, {BASE_FORMAT_KEY: json.dumps(entries)})
    model = Net()
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(AdapterFileError, match=f"unreadable {BASE_FORMAT_KEY} metadata"):
        load_adapter(model, tmp_path / "a")
    assert {name: type(module) for name, module in model.named_modules()} == before
    assert all(p.requires_grad for p in model.parameters())


def test_a_load_that_fails_midway_through_its_formats_changes_nothing(tmp_path):
    """Layers of two recorded formats are added in two steps; the second failing (a NaN weight
    cannot be quantized) undoes the first."""
    mixed = apply_lora(apply_lora(Net(), ["up"], r=4, quant="nf4"), ["blocks.0"], r=4, quant="int8")
    save_adapter(mixed, tmp_path / "a")
    model = Net()
    with torch.no_grad():
        model.blocks[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        load_adapter(model, tmp_path / "a")
    assert not any(isinstance(module, LoRALinear) for module in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_we_load_what_peft_saves(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "0", "1"], rank_pattern={"blocks.1": 6},
                             alpha_pattern={"up": 3}, use_rslora=True, init_lora_weights=False)
    peft_model = peft.get_peft_model(Net(), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    x = torch.randn(5, 32)
    expected = peft_model(x)
    fresh = load_adapter(Net(), tmp_path / "peft", quant="dense").eval()  # applies the adapters from the config
    torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=1e-5)
    assert fresh.blocks[1].r == 6 and fresh.up.lora_alpha == 3 and fresh.up.use_rslora
    adapted = load_adapter(_adapted(seed=5), tmp_path / "peft").eval()  # layers already there: weights replaced
    torch.testing.assert_close(adapted(x), expected, atol=1e-5, rtol=1e-5)


def test_round_trip_keeps_every_adapter_bit(tmp_path):
    model = _adapted()
    save_adapter(model, tmp_path / "a")
    restored = load_adapter(_adapted(seed=9), tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(_adapter_params(model).values(), _adapter_params(restored).values()))


def _break(folder, **changes):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS_NAME)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    save_file(tensors, folder / WEIGHTS_NAME)


@pytest.mark.parametrize("damage,fragment", [
    (lambda f: _break(f, **{"base_model__model__up__lora_A__weight": None}), r"missing keys \['up.lora_A.weight'\]"),
    (lambda f: _break(f, **{"base_model__model__head__lora_A__weight": torch.zeros(4, 64)}),
     r"unexpected keys \['head.lora_A.weight'\]"),
    (lambda f: _break(f, **{"base_model__model__up__lora_B__weight": torch.zeros(64, 5)}),
     r"mis-shaped \['up.lora_B.weight: \(64, 5\) in the file, \(64, 4\) in the model'\]"),
    (lambda f: _break(f, **{"base_model__model__up__lora_B__weight": torch.zeros(64, 4, dtype=torch.int32)}),
     "not floating point"),
    (lambda f: (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:100]), "unreadable safetensors"),
    (lambda f: (f / CONFIG_NAME).write_text("{not json"), "not valid JSON"),
    (lambda f: (f / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 8})), "'r' is missing"),
    (lambda f: (f / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 0, "lora_alpha": 8})),
     "'r' must be an int >= 1"),
    (lambda f: (f / CONFIG_NAME).write_text(json.dumps({"peft_type": "IA3", "r": 4, "lora_alpha": 8})),
     "'peft_type' must be 'LORA'"),
    (lambda f: (f / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                        "use_dora": True})), "use_dora=True is not supported"),
    (lambda f: (f / WEIGHTS_NAME).unlink(), "no such file"),
])
def test_bad_files_are_clear_errors_and_change_nothing(tmp_path, damage, fragment):
    save_adapter(_adapted(), tmp_path / "a")
    damage(tmp_path / "a")
    model = _adapted(seed=3)
    before = _adapter_params(model)
    with pytest.raises(AdapterFileError, match=fragment) as info:
        load_adapter(model, tmp_path / "a")
    assert str(tmp_path / "a") in str(info.value)
    assert all(torch.equal(before[name], p) for name, p in _adapter_params(model).items())


@pytest.mark.parametrize("option,value", [("use_dora", True),
                                          ("layers_to_transform", [0]), ("layer_replication", [[0, 1]]),
                                          ("lora_bias", True), ("trainable_token_indices", [3]), ("bias", "all")])
def test_each_refused_peft_option_is_named_with_what_to_do(tmp_path, option, value):
    from fusedlora.adapters import REFUSAL_HINTS

    save_adapter(_adapted(), tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps({**config, option: value}))
    with pytest.raises(AdapterFileError, match=re.escape(f"{option}={value!r} is not supported by fusedlora")) as info:
        load_adapter(_adapted(seed=3), tmp_path / "a")
    assert str(info.value).endswith(REFUSAL_HINTS[option])


def test_a_failed_load_into_a_plain_model_adds_no_layers(tmp_path):
    save_adapter(_adapted(), tmp_path / "a")
    _break(tmp_path / "a", **{"base_model__model__up__lora_A__weight": None})
    plain = Net()
    with pytest.raises(AdapterFileError):
        load_adapter(plain, tmp_path / "a")
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())


def _killed_midway(save_call: str, patch: str, cwd):
    """Run a save in a child process that is killed (SIGKILL) in the middle of writing."""
    script = textwrap.dedent(f"""
        import os, signal, torch, torch.nn as nn
        import fusedlora.adapters as adapters, fusedlora.checkpoint as checkpoint, fusedlora.safefiles as safefiles
        from tests_support import _adapted
        {patch}
        model = _adapted(seed=7)
        {save_call}
    """)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr


@pytest.fixture
def tests_support(tmp_path):
    (tmp_path / "tests_support.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom test_adapters import _adapted\n" % os.path.dirname(__file__))
    return tmp_path


def test_a_killed_adapter_save_leaves_the_previous_adapter(tmp_path, tests_support):
    original = _adapted()
    save_adapter(original, tmp_path / "a")
    kill_while_writing = textwrap.dedent("""
        real = safefiles.save_file
        def save_file(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            os.kill(os.getpid(), signal.SIGKILL)
        safefiles.save_file = save_file
    """).replace("\n", "\n        ")
    _killed_midway(f"adapters.save_adapter(model, {str(tmp_path / 'a')!r})", kill_while_writing, tests_support)
    restored = load_adapter(_adapted(seed=9), tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(_adapter_params(original).values(),
                                                  _adapter_params(restored).values()))


def test_a_save_killed_between_its_renames_is_still_loadable(tmp_path, tests_support):
    original = _adapted()
    save_adapter(original, tmp_path / "a")
    kill_between_renames = textwrap.dedent("""
        real_rename = os.rename
        def rename(source, target):
            real_rename(source, target)
            if ".previous-" in str(target):
                os.kill(os.getpid(), signal.SIGKILL)
        os.rename = rename
    """).replace("\n", "\n        ")
    _killed_midway(f"adapters.save_adapter(model, {str(tmp_path / 'a')!r})", kill_between_renames,
                   tests_support)
    assert not (tmp_path / "a").exists()
    with pytest.warns(UserWarning, match="interrupted save left the previous adapter"):
        restored = load_adapter(_adapted(seed=9), tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(_adapter_params(original).values(),
                                                  _adapter_params(restored).values()))


def test_a_killed_checkpoint_save_leaves_the_previous_checkpoint(tmp_path, tests_support):
    original = _adapted()
    save_training_state(tmp_path / "state.safetensors", original, step=3)
    kill_while_writing = textwrap.dedent("""
        def save_file(tensors, path, metadata=None):
            open(path, "wb").write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        safefiles.save_file = save_file
    """).replace("\n", "\n        ")
    _killed_midway(f"checkpoint.save_training_state({str(tmp_path / 'state.safetensors')!r}, model, step=9)",
                   kill_while_writing, tests_support)
    restored = _adapted(seed=9)
    assert load_training_state(tmp_path / "state.safetensors", restored)["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(_adapter_params(original).values(),
                                                  _adapter_params(restored).values()))


def _train(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 32, generator=generator)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_resuming_from_a_training_state_continues_bit_for_bit(tmp_path):
    model = _adapted()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model, optimizer, 3, seed=0)
    save_training_state(tmp_path / "state.safetensors", model, optimizer, step=3, extra={"epoch": 1})
    continued = _train(model, optimizer, 2, seed=1)

    resumed = _adapted(seed=11)
    resumed_optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=5.0)
    info = load_training_state(tmp_path / "state.safetensors", resumed, resumed_optimizer)
    assert info == {"step": 3, "extra": {"epoch": 1}}
    assert _train(resumed, resumed_optimizer, 2, seed=1) == continued
    assert all(torch.equal(a, b) for a, b in zip(_adapter_params(model).values(), _adapter_params(resumed).values()))


def test_a_training_state_that_does_not_fit_is_refused(tmp_path):
    save_training_state(tmp_path / "state.safetensors", _adapted(), step=1)
    other = apply_lora(Net(), ["up"], r=4, quant="dense")
    with pytest.raises(AdapterFileError, match="unexpected keys"):
        load_training_state(tmp_path / "state.safetensors", other)
    with pytest.raises(AdapterFileError, match="holds no optimizer state"):
        load_training_state(tmp_path / "state.safetensors", _adapted(),
                            torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0))


def _flip_byte(file, offset_from_end):
    data = bytearray(file.read_bytes())
    data[len(data) - offset_from_end] ^= 0x5A
    file.write_bytes(bytes(data))


def test_a_corrupted_tensor_is_named_and_changes_nothing(tmp_path):
    """A flipped byte inside the tensor data (which safetensors itself cannot notice) fails the
    checksum saved with the file; a flipped byte in its JSON header makes it unreadable."""
    save_adapter(_adapted(), tmp_path / "a")
    _flip_byte(tmp_path / "a" / WEIGHTS_NAME, 3)  # the data of the last tensor in the file
    model = _adapted(seed=3)
    before = _adapter_params(model)
    with pytest.raises(AdapterFileError, match=r"the bytes of \['base_model\.model\.up\.lora_B\.weight'\] do not "
                                               r"match the checksums saved with them \(the file is corrupted\)"):
        load_adapter(model, tmp_path / "a")
    assert all(torch.equal(before[name], p) for name, p in _adapter_params(model).items())
    save_adapter(_adapted(), tmp_path / "b")
    file = tmp_path / "b" / WEIGHTS_NAME
    data = bytearray(file.read_bytes())
    data[8] = ord("#")  # the first character of the header's JSON
    file.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="unreadable safetensors file"):
        load_adapter(model, tmp_path / "b")


def test_non_finite_adapter_values_are_refused(tmp_path):
    """A file without checksums (PEFT writes none) whose values are NaN is refused, by key."""
    save_adapter(_adapted(), tmp_path / "a")
    bad = torch.zeros(64, 4)
    bad[1, 2] = float("nan")
    _break(tmp_path / "a", **{"base_model__model__up__lora_B__weight": bad})
    with pytest.raises(AdapterFileError, match=r"holding NaN or Inf \['up.lora_B.weight'\]"):
        load_adapter(_adapted(seed=3), tmp_path / "a")


def test_a_damaged_training_state_is_named_and_changes_nothing(tmp_path):
    model = _adapted()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model, optimizer, 1, seed=0)
    file = tmp_path / "state.safetensors"
    save_training_state(file, model, optimizer, step=1)
    target = _adapted(seed=3)
    before = _adapter_params(target)
    wrong_optimizer = torch.optim.AdamW([p for p in target.parameters() if p.requires_grad][:2], lr=1e-2)
    with pytest.raises(AdapterFileError, match="its optimizer state does not fit this optimizer"):
        load_training_state(file, target, wrong_optimizer)
    _flip_byte(file, 5)
    with pytest.raises(AdapterFileError, match="do not match the checksums"):
        load_training_state(file, target)
    file.write_bytes(file.read_bytes()[:-200])
    with pytest.raises(AdapterFileError, match="unreadable safetensors file"):
        load_training_state(file, target)
    assert all(torch.equal(before[name], p) for name, p in _adapter_params(target).items())


# Every step of a save that touches the disk; the child is killed right after the n-th of them.
_KILL_AFTER_STEP = textwrap.dedent("""
    import pathlib
    steps = [0]
    def killing(function):
        def step(*args, **kwargs):
            result = function(*args, **kwargs)
            steps[0] += 1
            if steps[0] == {n}:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return step
    pathlib.Path.write_text = killing(pathlib.Path.write_text)
    safefiles.save_file = killing(safefiles.save_file)
    os.fsync = killing(os.fsync)
    os.rename = killing(os.rename)
    os.replace = killing(os.replace)
    shutil.rmtree = killing(shutil.rmtree)
""").replace("\n", "\n        ")


@pytest.mark.parametrize("n", range(1, 7))
def test_a_save_killed_after_any_step_leaves_a_whole_adapter(tmp_path, tests_support, n):
    """Killed after any of the save's disk steps before it completes (the config, the tensors, the
    two fsyncs, the first rename, the second rename): the folder loads whole, old or new."""
    original = _adapted()
    save_adapter(original, tmp_path / "a")
    patch = "import shutil\n        " + _KILL_AFTER_STEP.replace("{n}", str(n))
    _killed_midway(f"adapters.save_adapter(model, {str(tmp_path / 'a')!r})", patch, tests_support)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the recovery warning, tested above
        loaded = _adapter_params(load_adapter(_adapted(seed=9), tmp_path / "a"))
    candidates = [_adapter_params(original), _adapter_params(_adapted(seed=7))]
    assert any(all(torch.equal(loaded[key], c[key]) for key in loaded) for c in candidates)


def test_a_training_state_with_altered_metadata_or_no_checksums_is_refused(tmp_path):
    """The step, optimizer settings and `extra` live in the metadata: they are checksummed too,
    and a training state (only fusedlora writes them) must carry its checksums."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = tmp_path / "state.safetensors"
    save_training_state(file, _adapted(), step=1000)
    with safe_open(file, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    altered = {**metadata, "fusedlora_training_state": metadata["fusedlora_training_state"].replace("1000", "9000")}
    save_file(tensors, file, metadata=altered)
    with pytest.raises(AdapterFileError, match="its metadata does not match the checksum saved with it"):
        load_training_state(file, _adapted())
    save_file(tensors, file, metadata={k: v for k, v in metadata.items() if k != "fusedlora_blake2b"})
    with pytest.raises(AdapterFileError, match="the checksums fusedlora saves with this file are missing"):
        load_training_state(file, _adapted())
