"""Identity LoRA (DragDiffusion §3.2): a short peft fine-tune so denoising keeps the object's identity.

It stacks on top of the library LoRAs active on the UNet (``editing.lora_library.activate``): they stay
active (with their weights) and frozen while the identity LoRA trains and while it is applied.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from editing import cuda_graphs
from editing.sampling import add_noise, alpha_at, prediction, to_eps, unet_dtype

log = logging.getLogger(__name__)

# to_q, to_k, to_v, to_out.0 of every attention layer of the UNet (REFERENCE.md).
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES)


def _stack(unet, name: str) -> None:
    """Activate the library LoRAs already on ``unet`` (their weights) plus ``name`` at weight 1."""
    from editing.lora_library import active_loras, set_active

    set_active(unet, active_loras(unet) + [(name, 1.0)])


def _unstack(unet, name: str) -> None:
    """Remove adapter ``name`` and re-activate exactly the library LoRAs that were active before."""
    from editing.lora_library import active_loras, set_active

    unet.delete_adapters(name)
    set_active(unet, active_loras(unet))


def diffusion_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """L = E_{t,ε} ‖ε − ε_θ(√ᾱ_t z₀ + √(1−ᾱ_t) ε, t, c)‖²  (DDPM simple loss)."""
    return F.mse_loss(eps_pred.float(), eps.float())


class _NoisePredictor(torch.nn.Module):
    """ε_θ(z_t, t, c) for one fixed prompt and batch shape: the unit that is CUDA-graphed in training."""

    def __init__(self, unet, cond: torch.Tensor, amp_dtype: torch.dtype, use_amp: bool):
        super().__init__()
        self.unet, self.cond, self.amp_dtype, self.use_amp = unet, cond, amp_dtype, use_amp

    def forward(self, zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(zt.device.type, dtype=self.amp_dtype, enabled=self.use_amp, cache_enabled=False):
            x = zt if self.use_amp else zt.to(self.amp_dtype)
            out = self.unet(x, t, encoder_hidden_states=self.cond).sample
        pred, alphas = prediction(self.unet)  # a v-prediction model's output as ε (sampling.to_eps)
        if pred == "epsilon":
            return out
        return to_eps(out.float(), zt.float(), alpha_at(alphas.to(zt.device), t, out), pred)


def train_identity_lora(
    unet,
    posterior: tuple[torch.Tensor, torch.Tensor],
    cond: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    steps: int,
    rank: int,
    lr: float,
    seed: int,
    batch: int = 4,
    name: str = "identity",
    grad_checkpointing: bool = False,
    report: Callable[[float, str], None] | None = None,
    losses: list[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Fine-tune a fresh LoRA on one image; return its weights (CPU) and leave the UNet as it was.

    Each step draws ``batch`` fresh samples from the VAE posterior (mean, std) of the image, a
    uniform t and noise, and takes an AdamW step (betas .9/.999, wd 1e-2) on the ε-MSE
    (DragDiffusion §3.2; steps, rank and lr come from ``DragRequest``). ``report(frac, msg)`` is the
    run's progress, which raises ``EditCancelled`` once Cancel is pressed; ``losses`` (a list) receives
    every step's loss.
    """
    from peft import get_peft_model_state_dict

    device = posterior[0].device
    dtype = unet_dtype(unet)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded LoRA init without touching the global RNG
        torch.manual_seed(seed)
        unet.add_adapter(lora_config(rank), adapter_name=name)
    try:
        _stack(unet, name)  # subject LoRAs stay on (frozen): the identity LoRA learns what they leave out
        params = [p for n, p in unet.named_parameters() if f".{name}." in n]
        for p in params:  # train the adapter in fp32 even when the frozen UNet is fp16
            p.data = p.data.float()
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2)
        use_amp = device.type == "cuda" and dtype != torch.float32
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
        mean, std = posterior
        a_table = alphas_cumprod.to(device)
        unet.train()
        if grad_checkpointing:  # recompute activations in backward: less memory, ~30% more time
            unet.enable_gradient_checkpointing()
        shape = (batch, *mean.shape[1:])
        predict = _NoisePredictor(unet, cond.expand(batch, -1, -1).to(dtype), dtype, use_amp)
        predict = cuda_graphs.graphed(
            predict, (torch.zeros(shape, device=device), torch.zeros(batch, dtype=torch.long, device=device)),
            unet=unet, batch=batch, use=cuda_graphs.enabled(device) and not grad_checkpointing,
        )
        for step in range(steps):
            if report:
                report(step / steps, f"LoRA step {step + 1}/{steps}")
            z0 = mean + std * torch.randn(shape, generator=gen).to(device)
            noise = torch.randn(shape, generator=gen).to(device)
            t = torch.randint(0, len(a_table), (batch,), generator=gen).to(device)
            zt = add_noise(z0, noise, a_table[t].view(-1, 1, 1, 1))
            loss = diffusion_loss(predict(zt, t), noise)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if losses is not None:
                losses.append(loss.detach().item())
        state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}
        return state
    finally:
        if grad_checkpointing:
            unet.disable_gradient_checkpointing()
        unet.eval()
        _unstack(unet, name)
        unet.requires_grad_(False)


@contextlib.contextmanager
def lora_adapter(unet, state: dict[str, torch.Tensor] | None, rank: int, name: str = "identity"):
    """Attach a trained LoRA for the duration of the block; remove it afterwards (also on error)."""
    if not state:
        yield
        return
    from peft import set_peft_model_state_dict

    unet.add_adapter(lora_config(rank), adapter_name=name)
    try:
        dtype = next(p for n, p in unet.named_parameters() if ".lora_" not in n).dtype
        set_peft_model_state_dict(unet, state, adapter_name=name)
        for n, p in unet.named_parameters():
            if f".{name}." in n:
                p.data = p.data.to(dtype)
        _stack(unet, name)
        yield
    finally:
        _unstack(unet, name)
        unet.requires_grad_(False)
