import pytest
import torch


@pytest.fixture
def one_cpu_thread():
    """Run a test on one torch CPU thread (tiny models are fastest so, and a loaded 2-core machine
    does not stall), restoring the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """The shipped instruction-tuned tiny model and its tokenizer, loaded once per test module."""
    from esnb.models import load_model

    return load_model("tiny", device="cpu")
