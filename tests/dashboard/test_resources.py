"""XAI_DEVICE (issue 12): read at the dashboard's edge, it decides where the loaded models run."""

import torch

import dashboard.resources as resources
from tests.dashboard.conftest import no_trouble, open_app


def test_xai_device_reaches_the_loaded_classifier(on_tiny, monkeypatch):
    """PyTorch told it sees two GPUs; the loader records the device it is asked for (and loads on the CPU,
    the only device here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("XAI_DEVICE", "cuda:1")
    asked = []
    real = resources.load_classifier

    def recording(card_path, device="cpu", **kwargs):
        asked.append(device)
        return real(card_path, **kwargs)

    monkeypatch.setattr(resources, "load_classifier", recording)
    resources.classifier_from.clear()
    app = open_app()
    no_trouble(app)
    assert asked and set(asked) == {"cuda:1"}
    assert resources.device() == "cuda:1"


def test_unset_xai_device_is_auto_the_cpu_here(monkeypatch):
    monkeypatch.delenv("XAI_DEVICE", raising=False)
    assert not torch.cuda.is_available()
    assert resources.device() == "cpu"


def test_a_bad_xai_device_is_one_line_and_nothing_loads(on_tiny, monkeypatch):
    monkeypatch.setenv("XAI_DEVICE", "cuda")  # no GPU on this machine
    asked = []
    monkeypatch.setattr(resources, "load_classifier", lambda *args, **kwargs: asked.append(args))
    app = open_app()
    assert not app.exception
    assert [e.value for e in app.error] == [
        "XAI_DEVICE 'cuda': PyTorch sees no CUDA GPU on this machine (no driver, no GPU, or a CPU-only torch "
        "build); use cpu or auto"
    ]
    assert asked == []
