"""The user-conditioned Diffusion-DPO loss of PPD."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from torch import nn

__all__ = ["PPDLoss", "PPDLossOutput", "ppd_loss"]


@dataclass
class PPDLossOutput(BaseOutput):
    """Loss and diagnostics of one DPO batch (all but ``loss`` are detached).

    Args:
        loss: Scalar loss to back-propagate.
        implicit_accuracy: Fraction of pairs whose preferred sample the policy favours more than the
            reference does (``inside > 0``; an exact tie counts one half).
        model_diff: Per pair ``mse_w - mse_l`` of the policy, ``(pairs,)``.
        ref_diff: Per pair ``ref_mse_w - ref_mse_l`` of the reference, ``(pairs,)``.
        inside: Per pair argument of the log-sigmoid, ``(pairs,)``.
    """

    loss: torch.Tensor
    implicit_accuracy: torch.Tensor
    model_diff: torch.Tensor
    ref_diff: torch.Tensor
    inside: torch.Tensor


def _check(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor) -> None:
    for name, tensor in (("ref_pred", ref_pred), ("target", target)):
        if tensor.shape != model_pred.shape:
            raise ValueError(
                f"`{name}` must have the shape of `model_pred` {tuple(model_pred.shape)}, got {tuple(tensor.shape)}."
            )
    if model_pred.ndim < 2 or model_pred.shape[0] == 0 or model_pred.shape[0] % 2:
        raise ValueError(
            "`model_pred` must hold the preferred samples then the rejected ones along dim 0 (an even, non-zero "
            f"batch with at least one more dim), got shape {tuple(model_pred.shape)}."
        )


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def ppd_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    beta: float = 5000.0,
    weight: torch.Tensor | float | None = None,
    check_finite: bool = True,
) -> PPDLossOutput:
    r"""User-conditioned Diffusion-DPO loss.

    Dim 0 holds ``B`` preferred samples, then the ``B`` rejected ones (pair ``i`` is rows ``i`` and
    ``B + i``, noised with the same noise and timestep). With per-sample ``mse`` the mean over all
    non-batch dims of ``(pred - target)^2``::

        inside = -0.5 * beta * weight * ((mse_w - ref_mse_w) - (mse_l - ref_mse_l))
        loss   = mean(-log(sigmoid(inside)))

    This is the convention of the original Diffusion-DPO code and of diffusers' SDXL research script
    (``train_diffusion_dpo_sdxl.py``: ``-0.5 * beta_dpo``, default 5000), so the same ``beta`` means the
    same loss there and here; diffusers' SD 1.5 script (``train_diffusion_dpo.py``) folds the 0.5 into its
    beta instead, so its ``beta_dpo = 2500`` is this ``beta = 5000``. ``weight`` is the ``T * w(lambda_t)``
    factor (see ``timestep_weight``). When the policy equals the reference, ``inside == 0`` and the loss is
    exactly ``log 2``.

    Args:
        model_pred: Policy (user-conditioned) predictions ``(2B, ...)``.
        ref_pred: Reference predictions, same shape (no gradient needed).
        target: Regression target (the noise), same shape.
        beta: KL-regularisation strength; larger keeps the policy closer to the reference.
        weight: Optional per-pair factor on ``beta``: a float or a ``(B,)`` tensor.
        check_finite: Raise ``ValueError`` on NaN/Inf inputs (costs one device sync).

    Returns:
        ``PPDLossOutput``.

    Examples:
        >>> import torch
        >>> target = torch.zeros(4, 1)
        >>> pred = torch.tensor([[0.1], [0.2], [0.3], [0.4]])
        >>> out = ppd_loss(pred, pred.clone(), target)
        >>> round(out.loss.item(), 6)
        0.693147
    """
    _check(model_pred, ref_pred, target)
    if beta <= 0:
        raise ValueError(f"`beta` must be positive, got {beta}.")
    pairs = model_pred.shape[0] // 2
    mse = _per_sample_mse(model_pred, target)
    ref_mse = _per_sample_mse(ref_pred.detach(), target)
    if check_finite and not torch.isfinite(mse.sum() + ref_mse.sum()):
        for name, tensor in (("model_pred", model_pred), ("ref_pred", ref_pred), ("target", target)):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"`{name}` contains NaN or Inf values.")
        raise ValueError("The squared errors overflowed float32: are `model_pred` and `target` on the same scale?")

    model_diff = mse[:pairs] - mse[pairs:]
    ref_diff = ref_mse[:pairs] - ref_mse[pairs:]
    scale = -0.5 * beta
    if weight is not None:
        weight = torch.as_tensor(weight, dtype=torch.float32, device=mse.device)
        if weight.ndim > 0 and weight.shape != (pairs,):
            raise ValueError(f"`weight` must be a float or a ({pairs},) tensor, got shape {tuple(weight.shape)}.")
        scale = scale * weight
    inside = scale * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    implicit_accuracy = ((inside > 0).float() + 0.5 * (inside == 0).float()).mean()
    return PPDLossOutput(
        loss=loss,
        implicit_accuracy=implicit_accuracy.detach(),
        model_diff=model_diff.detach(),
        ref_diff=ref_diff.detach(),
        inside=inside.detach(),
    )


class PPDLoss(nn.Module):
    """Module form of ``ppd_loss`` with a fixed ``beta``.

    Args:
        beta: KL-regularisation strength (default 5000, the Diffusion-DPO value in this convention).
        check_finite: Raise on NaN/Inf inputs.

    Examples:
        >>> import torch
        >>> loss_fn = PPDLoss(beta=5000)
        >>> pred = torch.randn(4, 16, 8, 8)
        >>> loss_fn(pred, pred, torch.randn_like(pred)).implicit_accuracy.item()
        0.5
    """

    def __init__(self, beta: float = 5000.0, check_finite: bool = True):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"`beta` must be positive, got {beta}.")
        self.beta = beta
        self.check_finite = check_finite

    def forward(
        self,
        model_pred: torch.Tensor,
        ref_pred: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | float | None = None,
    ) -> PPDLossOutput:
        """See ``ppd_loss``."""
        return ppd_loss(model_pred, ref_pred, target, self.beta, weight, self.check_finite)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"
