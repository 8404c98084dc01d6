"""The model with Triton kernels (interpreter on CPU) equals the same model with plain PyTorch kernels."""
import pytest
import torch

from megatron_mixln import ConfigError, ModelConfig, build_model
from megatron_mixln.model import causal_lm_loss

TINY = dict(vocab_size=61, hidden_size=40, intermediate_size=72, num_layers=2, num_heads=4, max_seq_len=16,
            mix_alpha=0.5)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("placement", ["pre", "post", "mix", "deepnorm", "sandwich", "lns"])
def test_triton_model_trains_like_the_torch_model(placement):
    models = {k: build_model(ModelConfig(**TINY, norm_placement=placement, kernels=k), seed=11)
              for k in ("torch", "triton")}
    assert models["torch"].state_dict().keys() == models["triton"].state_dict().keys()  # same checkpoint names
    # SGD, not Adam: Adam turns rounding-level gradient differences on near-zero gradients into lr-sized steps.
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.5) for k, m in models.items()}
    ids = torch.randint(0, TINY["vocab_size"], (3, 16))
    labels = torch.roll(ids, -1, dims=1)
    for step in range(2):
        losses = {}
        for kind, model in models.items():
            loss = causal_lm_loss(model(ids), labels)
            loss.backward()
            losses[kind] = loss.item()
        assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5), f"step {step}"
        grads = {k: dict((n, p.grad) for n, p in m.named_parameters()) for k, m in models.items()}
        for name, grad in grads["torch"].items():
            assert rel(grads["triton"][name], grad) < 1e-4, f"{name} at step {step}"
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad()


def test_apex_without_apex_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import apex.normalization  # noqa: F401
        pytest.skip("apex is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="model.kernels='apex'.*not installed"):
        build_model(ModelConfig(**TINY, kernels="apex"))
