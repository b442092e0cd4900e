"""How far one optimiser step moves a product block's output: a learning-speed diagnostic.

Adam moves every weight by about ``lr`` on its first step whatever the weight's size, so how
far the block's *output* moves depends on where a backend keeps its scale (in the weights, as
mace does, or in a fixed multiplier). Comparing this number across backends at equal lr says
whether they learn at the same speed per step, independently of what they can express.
"""

import torch


def adam_step_change(
    module: torch.nn.Module,
    x: torch.Tensor,
    node_attrs: torch.Tensor,
    lr: float = 0.01,
    seed: int = 0,
) -> float:
    """``|y1 - y0| / |y0|`` (Frobenius) after one Adam step (lr) on the random linear loss
    ``sum(y * R)``, R i.i.d. standard normal; ``module``'s parameters are restored afterwards.

    Layout: x [n, C, (L_in+1)^2], node_attrs [n, E] (one-hot), as for every tp backend.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    y0 = module(x, node_attrs)
    gen = torch.Generator(device=y0.device).manual_seed(seed)
    direction = torch.randn(y0.shape, generator=gen, dtype=y0.dtype, device=y0.device)
    optimiser = torch.optim.Adam(params, lr=lr)
    optimiser.zero_grad()
    (y0 * direction).sum().backward()
    optimiser.step()
    with torch.no_grad():
        y1 = module(x, node_attrs)
        for p, value in zip(params, saved, strict=True):
            p.copy_(value)
            p.grad = None
    return ((y1 - y0.detach()).norm() / y0.detach().norm()).item()
