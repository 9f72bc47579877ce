"""The guidance energies of DragonDiffusion / DiffEditor as pure functions of UNet features.

Features are (1, C, H, W) per level; s = (cos + 1) / 2; every energy has the form w / (1 + 4·sim).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cos_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over channels: (…, C, H, W) or (N, C) pairs -> (…, H, W) or (N,)."""
    dim = 1 if a.ndim >= 2 else 0
    return F.cosine_similarity(a, b, dim=dim)


def energy(sim: torch.Tensor, w: float) -> torch.Tensor:
    """E = w / (1 + 4·mean(sim))  (DragonDiffusion eq. 4-6): low when the features agree."""
    return w / (1 + 4 * sim.mean())


def half_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(cos + 1) / 2 in [0, 1], the similarity the drag, appearance and paste energies use."""
    return (cos_sim(a, b) + 1) / 2


def cells(f: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) features at flat cell indices -> (N, C)."""
    return f.flatten(2)[0, :, idx].T


def drag_energies(cur, ref, handle_cells, target_cells, outside, w_edit, w_content, w_inpaint):
    """DragonDiffusion drag: per point, E_edit = w_edit / (1 + 4·s(F_cur[target], F_orig[handle])) plus
    w_inpaint · s(F_cur, F_orig) on the handle cells the target does not cover (they should change);
    E_content = w_content / (1 + 4·s(F_cur, F_orig)) outside the mask. s = (cos + 1)/2, averaged over levels
    and points."""
    e_edit, e_con = 0.0, 0.0
    for fc, fr in zip(cur, ref):
        for hc, tc in zip(handle_cells, target_cells):
            e_edit = e_edit + energy(half_cos(cells(fc, tc), cells(fr, hc)), w_edit)
            vacated = hc[~torch.isin(hc, tc)]
            if len(vacated) and w_inpaint:
                e_edit = e_edit + w_inpaint * half_cos(cells(fc, vacated), cells(fr, vacated)).mean()
        if outside.any():
            e_con = e_con + energy(half_cos(fc, fr)[0][outside], w_content)
    n = len(cur)
    return e_edit / n / len(handle_cells), e_con / n


def move_energies(cur, ref, placed_ref, new, old, other, hole_ref, w_edit, w_content, w_contrast, w_inpaint):
    """DragonDiffusion move (levels weighted ½ each):
    E_edit = w_edit / (1 + 4·cos(F_cur, F_placed)) inside the new location;
    E_content = w_content / (1 + 4·cos(F_cur, F_orig)) outside old ∪ new
              + w_contrast · s(F_cur, F_orig) on the vacated area (it must stop looking like the object)
              + w_inpaint / (1 + 4·s(mean F_cur[vacated], mean F_orig[hole reference])) (fill like the background)."""
    vacated = old & ~new
    e_edit, e_con = 0.0, 0.0
    for fc, fr, fp in zip(cur, ref, placed_ref):
        e_edit = e_edit + 0.5 * energy(cos_sim(fc, fp)[0][new], w_edit)
        if other.any():
            e_con = e_con + 0.5 * energy(cos_sim(fc, fr)[0][other], w_content)
        if vacated.any():
            e_con = e_con + 0.5 * w_contrast * half_cos(fc, fr)[0][vacated].mean()
            if hole_ref.any():
                filled = fc[0][:, vacated].mean(1)
                background = fr[0][:, hole_ref].mean(1)
                e_con = e_con + energy(half_cos(filled, background), w_inpaint)
    return e_edit, e_con


def appearance_energies(cur, base, refimg, base_mask, ref_mask, w_edit, w_content):
    """DiffEditor appearance: E_edit = w_edit / (1 + 4·s(mean F_cur[base mask], mean F_ref[ref mask]))
    (a global match of the object's look); E_content = w_content / (1 + 4·s(F_cur, F_base)) outside."""
    e_edit, e_con = 0.0, 0.0
    for fc, fb, fr in zip(cur, base, refimg):
        e_con = e_con + energy(half_cos(fc, fb)[0][~base_mask], w_content)
        e_edit = e_edit + energy(half_cos(fc[0][:, base_mask].mean(1), fr[0][:, ref_mask].mean(1)), w_edit)
    return e_edit, e_con


def paste_energies(cur, base, placed, mask, w_edit, w_content):
    """DiffEditor paste: E_edit = w_edit / (1 + 4·s(F_cur, F_placed-reference)) cell by cell inside the pasted
    region; E_content = w_content / (1 + 4·s(F_cur, F_base)) outside it."""
    e_edit, e_con = 0.0, 0.0
    for fc, fb, fp in zip(cur, base, placed):
        e_con = e_con + energy(half_cos(fc, fb)[0][~mask], w_content)
        e_edit = e_edit + energy(half_cos(fc, fp)[0][mask], w_edit)
    return e_edit, e_con


