"""The L2 threat model's pieces of PGD (engine.attacks.pgd with norm='l2'): its random start and its update.

Written as torchattacks' PGDL2 (github Harry24k/adversarial-attacks-pytorch, torchattacks/attacks/pgdl2.py at
27e658c, PGDL2.forward):
- start: delta = r * eps * z / ||z||_2 with z ~ N(0, I) (a uniformly random direction) and r ~ U(0, 1) per example
  (the radius is uniform in [0, eps], as there: not the volume-uniform eps * r^(1/d), which in d = 3072 dimensions
  would put every start on the sphere), then x + delta clipped to [0, 1];
- step: x_adv + step_size * g / (||g||_2 + 1e-10) (torchattacks' eps_for_division), then the projection onto the
  ball, delta * min(1, eps / ||delta||_2) with delta = x_adv - x, then clipped to [0, 1] (clipping moves every pixel
  towards x, so the point stays in the ball).
Norms are per example over all non-batch dimensions; packed seeds (engine.packing: x is [B, K*C, H, W], K seeds'
channel blocks side by side) take one norm per example and seed, over that seed's block (`groups` = K). Pure tensor
functions: no host syncs, so a captured or compiled training step can run them.
"""
import torch

GRAD_EPS = 1e-10  # torchattacks PGDL2 eps_for_division: a zero gradient gives a zero step, not NaN
# The projection divides eps by ||delta||: where delta is 0 (a start at x, a zero step) the factor is clamped to 1
# instead of eps / 0 (inf, or NaN for eps = 0).
TINY = 1e-30


def group_norms(t: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """[B, groups]: the L2 norm of each example's (and each packed seed's) slice of t [B, groups * C, ...]."""
    blocks = t.unflatten(1, (groups, -1))  # a view: seed k's channels are the k-th block of dim 1
    return torch.linalg.vector_norm(blocks, dim=tuple(range(2, blocks.dim())))


def per_group(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values [B, groups] shaped to broadcast against like [B, groups * C, ...]: each seed's value over its channels."""
    groups = values.shape[1]
    if groups > 1:
        values = values.repeat_interleave(like.shape[1] // groups, dim=1)
    return values.reshape(values.shape + (1,) * (like.dim() - 2))


def l2_start(x: torch.Tensor, eps: float, *, groups: int = 1, clamp: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """x + r * eps * z / ||z|| (see the module docstring), clipped to [0, 1] unless clamp is False. The direction z
    then the radii r are drawn in logical (NCHW) order in x's dtype: from torch's default generator on x's device
    (generator None, training), or from `generator` on its own device and the start then moved to x's device (the
    evaluation's seeded CPU generator, as engine.attacks.random_start for L-inf)."""
    device = x.device if generator is None else generator.device
    z = torch.empty(x.shape, dtype=x.dtype, device=device).normal_(generator=generator)
    r = torch.empty((x.shape[0], groups), dtype=x.dtype, device=device).uniform_(0, 1, generator=generator)
    delta = z * per_group(r / group_norms(z, groups) * eps, z)
    x_start = x + delta.to(x.device)
    return x_start.clamp(0, 1) if clamp else x_start


def pgd_l2_update(x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps: float, step_size: float,
                  groups: int = 1) -> torch.Tensor:
    """One PGD-L2 step from x_adv: along grad / ||grad||, projected onto the eps-ball around x, clipped to [0, 1]."""
    step = grad / (per_group(group_norms(grad, groups), grad) + GRAD_EPS)
    delta = x_adv + step_size * step - x
    factor = (eps / group_norms(delta, groups).clamp_min(TINY)).clamp(max=1)
    return (x + delta * per_group(factor, delta)).clamp(0, 1)
