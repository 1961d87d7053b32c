"""Mean fill: hold the residual stream's component along d at its typical value, not at zero.

Zero ablation (``orthogonalise_in_place``) leaves every layer's output with no component along
d, a state the model never saw in training: whatever offset the stream normally has along d is
lost along with the variation that carries the information, and the readers (norms, attention,
MLPs, the head) see a shifted stream. Mean ablation keeps the offset and removes only the
variation, the standard choice for ablations in interpretability (e.g. Wang et al. 2023).

As weights: after orthogonalisation every write is orthogonal to d, so the stream's d-component
is whatever the biases along d add up to. With mu_L the mean projection on d of the original
model's layer-L output over calibration tokens, the MLP output projection of layer L gets the
bias increment (mu_L - mu_{L-1}) d (mu_{-1} = 0), so after layer L the component is
sum_{j <= L} (mu_j - mu_{j-1}) = mu_L for every input at every position. Inside layer L the
attention and the MLP read the stream at mu_{L-1}, its value after the previous layer.

The embeddings stay at 0 along d (mu_{-1} = 0), so layer 0's sublayers read a stream without
its embedding-level offset. It does not matter: on SmolLM2-135M with the WinoGender direction
(layer 14) the token embeddings' projection on d over calibration tokens has mean 0.016 (sd
0.105, rows of norm 2.6; the layer-14 output has mean -11.2, sd 12.4), and holding it too (every
embedding row given that component, layer 0's increment reduced by it) moved the perplexity
ratio on 2048 WikiText-2 test tokens from x1.0411 to x1.0409. It would also be one more edit
of every embedding row, and impossible through OPT's ``project_in``, which has no bias.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelsurgery.editing.ablate_direction.config import Fill
from modelsurgery.editing.ablate_direction.orthogonalize import (
    Orthogonalised,
    orthogonalise_in_place,
)
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.output_bias import enable_output_bias


@torch.no_grad()
def layer_mean_projections(
    model: nn.Module, unit: torch.Tensor, ids: torch.Tensor, batch_size: int = 4
) -> torch.Tensor:
    """Mean projection on unit d of every decoder layer's output over every position of the
    token windows ``ids`` (n, T) (unpadded): shape (layers,), float64."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    unit = unit.double().to(device)
    sums = torch.zeros(adapter.num_layers, dtype=torch.float64, device=device)

    def hook_for(layer: int) -> Any:
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T, H)
            # Each layer on its own device in a placed model.
            sums[layer] += (hidden.double() @ unit.to(hidden.device)).sum().to(sums.device)

        return hook

    handles = [
        adapter.layer(i).register_forward_hook(hook_for(i)) for i in range(adapter.num_layers)
    ]
    try:
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return (sums / ids.numel()).cpu()


@torch.no_grad()
def _hold_at(model: nn.Module, unit: torch.Tensor, means: torch.Tensor) -> Orthogonalised:
    """Give each layer's MLP output projection the bias increment (mu_L - mu_{L-1}) d; the
    model must already be orthogonalised against d (all its writes have no d component)."""
    adapter = get_adapter(model)
    added, overrides = enable_output_bias(model, "mlp_out")
    result = Orthogonalised(config_overrides=dict(overrides))
    for name in added:  # zero gate/up biases too (Llama's mlp_bias): stored, or no rebuild
        result.changed[name] = model.get_parameter(name)
    previous = 0.0  # mu_{-1}: the embeddings carry no d component
    for layer, mean in enumerate(means.tolist()):
        projection = adapter.mlp_out(layer)
        bias = projection.bias
        assert bias is not None  # enable_output_bias gave every layer one
        step = (mean - previous) * unit.double().to(bias.device)  # (H,)
        bias.copy_(bias.double() + step)
        result.changed[f"{adapter.mlp_out_path(layer)}.bias"] = bias
        previous = mean
    return result


def ablate_in_place(
    model: nn.Module,
    direction: torch.Tensor,
    *,
    fill: Fill = "zero",
    calibration: torch.Tensor | None = None,
    batch_size: int = 4,
) -> Orthogonalised:
    """Ablate ``direction`` (hidden,) from the residual stream: zero its component everywhere
    (``"zero"``), or hold it after each layer at its mean over the ``calibration`` windows
    (n, T) of the unedited model (``"mean"``). ``held`` says where it is held."""
    unit = direction.double() / direction.double().norm()  # (H,)
    if fill == "zero":
        return orthogonalise_in_place(model, unit)
    if calibration is None:
        raise ValueError("fill: mean needs calibration token windows")
    means = layer_mean_projections(model, unit, calibration, batch_size)  # (L,), unedited
    result = orthogonalise_in_place(model, unit)
    held = _hold_at(model, unit, means)
    result.changed.update(held.changed)
    result.config_overrides.update(held.config_overrides)
    result.held = means
    return result
