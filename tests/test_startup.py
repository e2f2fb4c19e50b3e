"""Start-up: importing the package is cheap, the model registers itself on first use, and a
fresh `bitnet-train` process imports torch and transformers outside the garbage collector."""
import gc
import subprocess
import sys

from bitnet_train import cli


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_importing_the_package_and_its_cli_loads_neither_torch_nor_transformers():
    loaded = run_python("import sys, bitnet_train, bitnet_train.cli; print('torch' in sys.modules, "
                        "'transformers' in sys.modules)")
    assert loaded.split() == ["False", "False"]


def test_the_model_classes_load_on_first_use_and_register_with_the_auto_classes():
    out = run_python(
        "import bitnet_train\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "cls = bitnet_train.BitNetTrainForCausalLM\n"
        "config = AutoConfig.for_model('bitnet_train', vocab_size=32, hidden_size=16, intermediate_size=32,\n"
        "    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)\n"
        "print(type(config) is bitnet_train.BitNetTrainConfig,\n"
        "      type(AutoModelForCausalLM.from_config(config)) is cls)"
    )
    assert out.split() == ["True", "True"]


def test_a_fresh_process_imports_with_the_collector_paused_then_freezes_what_it_made():
    out = run_python(
        "import gc\n"
        "from bitnet_train.cli import long_lived_imports\n"
        "with long_lived_imports(fresh_process=True):\n"
        "    paused = not gc.isenabled()\n"
        "    import torch\n"
        "print(paused, gc.isenabled(), gc.get_freeze_count() > 100_000)"
    )
    assert out.split() == ["True", "True", "True"]


def test_a_caller_that_imported_torch_already_keeps_its_collector_as_it_was():
    frozen = gc.get_freeze_count()
    with cli.long_lived_imports(fresh_process=False):
        assert gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
