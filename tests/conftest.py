import os
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: the cores shared among the workers, not N x all of them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    # xdist's workers start with SIGINT ignored, and a process inherits that: the CLI the tests start would ignore
    # the Ctrl-C they send it. Restored here, children get SIGINT as from a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny():
    from vlacache.backbones.openvla import build_preset

    return build_preset("tiny", seed=0)


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
    from demo_fixture import write_demo_folder

    return write_demo_folder(tmp_path_factory.mktemp("demos"))


@pytest.fixture(scope="session")
def frames():
    from vlacache.envs.replay import ReplayEnv

    env = ReplayEnv()
    out = [env.reset()]
    for _ in range(5):
        out.append(env.step(None)[0])
    return out


def tiny_llama(attn="sdpa", layers=4, kv_heads=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, attn_implementation=attn,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()
