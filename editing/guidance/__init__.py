"""Training-free guided editing: DragonDiffusion (Mou et al., ICLR 2024) and DiffEditor (Mou et al., CVPR 2024).
Move, appearance and paste live here; the guided drag is one of the drag methods (``editing.drag.guided``), on
the same sampler.

One UNet does everything (the official code keeps a second copy for features):

1. **Inversion with a memory bank.** DDIM inversion of the image (text only, no CFG) keeps every latent
   z_0…z_T and, through attention processors, the input of every decoder self-attention layer at every
   step. K = W_k·h and V = W_v·h, so keeping h is the same information as keeping K and V at half the
   memory; the stock SDPA processor recomputes K/V from it.
2. **Visual cross-attention.** While sampling, the decoder's self-attention reads the bank: *replace*
   (move), *concatenate* (drag), or *splice* the base image's background with the reference object's
   tokens (appearance, paste).
3. **Gradient guidance.** At guided steps, a forward pass of the edited latent and of the inverted latent
   at the same step (stopped after ``up_blocks[2]``, no bank) gives ``up_blocks[1]``/``[2]`` features on a
   grid of 2 cells per latent cell (¼ of the image for SD-1.5); energies of the form w / (1 + 4·sim)
   compare them. Their gradients — the edit term's inside the edit region, the content term's outside — are added to the noise prediction used for x̂₀.
4. **DiffEditor extras.** Guidance at i < 10 and every even i < 30; regional SDE (η inside the edit region,
   0 outside) for 10 < i < 20; time travel (each of i = 22, 24, 26, 28 runs three times, re-noised by one
   DDIM inversion step in between); an optional IP-Adapter image prompt for 10 ≤ i < 20.

Step indices are those of the published 50-step schedule; other step counts map onto it proportionally.
"""
from editing.guidance import tasks  # registers move, appearance and paste

__all__ = ["tasks"]
