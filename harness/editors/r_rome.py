"""R-ROME (Gupta, Baskaran and Anumanchipalli, 2024, "Rebuilding ROME: Resolving Model Collapse during Sequential
Model Editing").

ROME's closed form (``rome.py``) asks W' k = v* for a key k and whitens the direction with C = E[k k^T]:

    W' = W + (v* - W k) (C^-1 k*)^T / ((C^-1 k*)^T k)

In the reference ROME implementation two different keys appear in it: the numerator's direction uses k*, the key
averaged over model-generated prefixes (ROME eq. 3), while the key that must map to v* (k, and the current output
W k it replaces) is the key of the bare prompt. When the bare prompt begins with the subject ("{subject} plays
...") that key is computed with no context at all and can be far from k*; (C^-1 k*)^T k is then small and the
update explodes, a "disabling edit" that collapses the model. R-ROME uses the same key in both places:

    k   = k*                                       [d_in]   averaged over the context templates, as in the numerator
    W k = W k* + b                                 [d_out]  the layer's current output for k* (b: the bias, GPT-2)
        (= the mean of the layer's outputs over the prefixed prompts, the layer being affine)
    W' = W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*)

so the edit is the exact rank-one solution of W' k* = v*, and (C^-1 k*)^T k* > 0 since C is positive definite.
v* is ROME's (eq. 4): the bare prompt's value plus the optimised delta. Everything else, hyper-parameters
included, is ROME's.

Reference: the authors' implementation as merged in EasyEdit, ``easyeditor/models/r_rome/compute_v.py``
(``enable_random_prefix_keys``: ``cur_input`` and ``cur_output`` averaged over the context templates; the target
``target_init + delta``; ``right_vector = (target - cur_output) / dot(cur_input, left_vector)``).
"""
from __future__ import annotations

import torch

from ..data.case import EditCase
from ..models.loading import LoadedModel
from .base import Capabilities, register_editor
from .rome import ROME, RomeHparams


@register_editor
class RROME(ROME):
    name = "r_rome"
    Hparams = RomeHparams
    capabilities = Capabilities(needs_key_stats=True, changes="weights", batches=False, values_ahead=True)

    @torch.no_grad()
    def target_key(self, lm: LoadedModel, case: EditCase, k_star: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k*, W k* + b): the prefix-averaged key, the one that also sets the update's direction, and the edited
        layer's current output for it."""
        layer = self.hparams.layer
        W = lm.adapter.weight_as_linear(lm.model, layer)                        # [d_out, d_in] (a view)
        current = W.float() @ k_star.to(W.device, torch.float32)                # [d_out]
        bias = getattr(lm.adapter.module(lm.model, lm.adapter.mlp_name(layer)), "bias", None)
        if bias is not None:
            current = current + bias.float()                                    # [d_out]
        return k_star, current
