"""Keys and target values shared by the locate-then-edit editors (ROME, R-ROME, MEMIT, AlphaEdit, D4S).

Notation (ROME paper): at edit layer l the MLP output projection W [d_out, d_in] maps a key k [d_in] (the MLP's
hidden activation at the subject's last token) to a value v = W k [d_out]. An edit asks W to map the subject's key
k* to a value v* that makes the model say the new target.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..data.case import EditCase
from ..data.corpus import sample_continuations
from ..models.loading import LoadedModel
from ..models.kvcache import cache_arg, returned_cache
from ..models.partial import block_input, layers_from, stop_after, supports_layers_from
from ..models.snapshot import param_digest
from ..tokens import encode_target, pad_batch  # noqa: F401 - encode_target re-exported for editors


# --- tokenisation -------------------------------------------------------------------------------------
def batch_encode(tok, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, [n, T]."""
    enc = tok(list(texts), return_tensors="pt", padding=True)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def subject_last_index(tok, template: str, subject: str) -> int:
    """Index of the subject's last token in ``template.format(subject)`` (ROME's "subject_last" strategy)."""
    prefix = template[: template.index("{}")] + subject
    return len(tok(prefix).input_ids) - 1


# --- hooks --------------------------------------------------------------------------------------------
def _first(x):
    return x[0] if isinstance(x, tuple) else x


# Some decoder blocks run their MLP on flattened tokens: OPT's ``OPTDecoderLayer`` reshapes the hidden states
# [b, T, d] to [b * T, d] before fc1/fc2, so a hook on the MLP output projection sees [b * T, d_in] / [b * T, d_out]
# where every other family gives [b, T, d_in] / [b, T, d_out]. Hooks that index (row, token) view such a tensor as
# [b, T, d] with ``as_btd`` (b, T: the shape of the current forward's input_ids [b, T]) and give a modified tensor
# back in the shape the module produced with ``restore_shape``.
def as_btd(t: torch.Tensor, b: int, T: int) -> torch.Tensor:
    """A hooked token tensor as [b, T, d]: [b * T, d] (flattened tokens, OPT) -> a view [b, T, d]; [b, T, d] as it
    is. Anything else is an error (no silent mis-indexing of a tensor whose layout is not known)."""
    if t.dim() == 3 and tuple(t.shape[:2]) == (b, T):
        return t                                                    # [b, T, d]
    if t.dim() == 2 and t.shape[0] == b * T:
        return t.view(b, T, t.shape[-1])                            # [b * T, d] -> [b, T, d]
    raise ValueError(f"hooked tensor of shape {tuple(t.shape)} is neither [b, T, d] nor [b * T, d] "
                     f"for the forward pass's b = {b}, T = {T}")


def restore_shape(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` [b, T, d] back in the shape of the hooked tensor ``like`` ([b, T, d] as is, or [b * T, d])."""
    return t if t.shape == like.shape else t.reshape(like.shape)


def token_grid(inputs: torch.Tensor) -> tuple[int, int]:
    """(b, T) of a forward pass from its input_ids / attention mask [b, T] or inputs_embeds [b, T, d]."""
    return int(inputs.shape[0]), int(inputs.shape[1])


@contextlib.contextmanager
def capture_io(module: torch.nn.Module) -> Iterator[dict]:
    """Record a module's first input and its output on the next forward pass."""
    store: dict = {}

    def hook(_m, inputs, output):
        store["input"] = _first(inputs)
        store["output"] = _first(output)

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@torch.no_grad()
def module_io_at(lm: LoadedModel, module_name: str, texts: Sequence[str], positions: Sequence[int],
                 batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's input and output vectors at one token position per text: ([n, d_in], [n, d_out]). The pass
    stops after the module (``stop_after``): the layers above it cannot change what it sees."""
    module = lm.model.get_submodule(module_name)
    ins, outs = [], []
    for s in range(0, len(texts), batch_size):
        ids, mask = batch_encode(lm.tokenizer, texts[s:s + batch_size], lm.device)
        pos = torch.tensor(positions[s:s + batch_size], device=ids.device)
        rows = torch.arange(len(pos), device=ids.device)
        with capture_io(module) as io, stop_after(module):
            lm.model.base_model(input_ids=ids, attention_mask=mask)
        if not io:                                  # a module outside the base model (the output head)
            with capture_io(module) as io:
                lm.model(input_ids=ids, attention_mask=mask)
        b, T = token_grid(ids)
        ins.append(as_btd(io["input"], b, T)[rows, pos].float())       # [b, T, d_in] -> [b, d_in]
        outs.append(as_btd(io["output"], b, T)[rows, pos].float())     # [b, T, d_out] -> [b, d_out]
    return torch.cat(ins), torch.cat(outs)


# --- context templates --------------------------------------------------------------------------------
def generate_context_templates(lm: LoadedModel, length_params: Sequence[Sequence[int]],
                               seed_prompts: Sequence[str], seed: int = 0, top_k: int = 5,
                               brace: str = " ") -> list[str]:
    """``["{}"]`` plus model-generated prefixes ``"<text>. {}"``: for each ``(length, n)``, ``n // len(seeds)``
    samples per seed prompt (at least one), ``length`` tokens in all (seed included), sampled as ROME's
    ``generate_fast`` (``sample_continuations``: plain top-k at temperature 1, leading space kept).
    ROME seeds with ``<|endoftext|>`` (the tokenizer's EOS stands in when the vocabulary lacks it) and deletes
    braces (``brace=""``); MEMIT seeds with "The", "Therefore", "Because", "I", "You" and turns braces into spaces.

    Sampling uses a private generator seeded with ``seed``: reproducible, and the global RNG is untouched."""
    tok = lm.tokenizer
    vocab = tok.get_vocab()
    seeds = [s if s != "<|endoftext|>" or s in vocab else (tok.eos_token or tok.bos_token) for s in seed_prompts]
    gen = torch.Generator(device=lm.device).manual_seed(int(seed))
    templates = ["{}"]
    for length, n_gen in length_params:
        per_seed = max(1, int(n_gen) // len(seeds))
        prompts = [s for s in seeds for _ in range(per_seed)]            # prompt-major, as the reference
        for text in sample_continuations(lm, prompts, int(length), top_k, gen):
            templates.append(text.replace("{", brace).replace("}", brace) + ". {}")
    return templates


def template_groups(length_params: Sequence[Sequence[int]], n_seeds: int) -> list[int]:
    """Sizes of the template groups in ``generate_context_templates``' output: the bare ``"{}"`` and then one group
    per ``(length, n)``."""
    return [1] + [max(1, int(n) // n_seeds) * n_seeds for _, n in length_params]


class ContextTemplates:
    """The owner of one editor's context templates: generated by the unedited model at first use, once per model
    (fingerprint), kept across edits, and part of the editor's state so that a resumed sequential run does not
    generate them again from an edited model. ``hparams`` needs ``context_template_length_params``,
    ``context_seed_prompts`` and ``template_seed``; ``brace`` is what braces in generated text become."""

    def __init__(self, hparams, brace: str = " ") -> None:
        self.hparams = hparams
        self.brace = brace
        self._by_model: dict[str, list[str]] = {}

    def __call__(self, lm: LoadedModel) -> list[str]:
        key = lm.identity.get("fingerprint", "")
        if key not in self._by_model:
            hp = self.hparams
            self._by_model[key] = generate_context_templates(
                lm, hp.context_template_length_params, hp.context_seed_prompts, seed=hp.template_seed,
                brace=self.brace)
        return self._by_model[key]

    def groups(self) -> list[int]:
        """The group sizes of the templates (``template_groups``), for group-wise key averaging."""
        hp = self.hparams
        return template_groups(hp.context_template_length_params, len(hp.context_seed_prompts))

    def state(self) -> dict[str, list[str]]:
        return dict(self._by_model)

    def load_state(self, state: dict[str, list[str]]) -> None:
        self._by_model.update(state)


def prompts_in_templates(case: EditCase, templates: Sequence[str]) -> list[str]:
    """Each context template wrapped around the case's prompt template (still holding "{}" for the subject)."""
    return [t.replace("{}", case.prompt) if t != "{}" else case.prompt for t in templates]


def group_mean(keys: torch.Tensor, group_sizes: Sequence[int] | None) -> torch.Tensor:
    """keys [m, d] -> [d]: the mean within each consecutive group of rows, then the mean of the group means
    (MEMIT's ``compute_ks``: with groups [1, 5] the bare prompt weighs 1/2). ``None``: one group, the plain mean
    over all rows (ROME's ``compute_u``: with 1 + 20 templates the bare prompt weighs 1/21)."""
    if group_sizes is None:
        return keys.mean(0)
    if sum(group_sizes) != keys.shape[0]:
        raise ValueError(f"template groups {list(group_sizes)} do not cover the {keys.shape[0]} keys")
    return torch.stack([g.mean(0) for g in torch.split(keys, list(group_sizes))]).mean(0)


def average_key(lm: LoadedModel, layer: int, case: EditCase, templates: Sequence[str],
                group_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """k*: the key [d_in] at the subject's last token, averaged over context templates (ROME eq. 3), flat or by
    template group (``group_mean``)."""
    filled = prompts_in_templates(case, templates)
    texts = [p.format(case.subject) for p in filled]
    idxs = [subject_last_index(lm.tokenizer, p, case.subject) for p in filled]
    keys, _ = module_io_at(lm, lm.adapter.mlp_name(layer), texts, idxs)
    return group_mean(keys, group_sizes)


def plain_key_value(lm: LoadedModel, layer: int, case: EditCase) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value at the subject's last token of the bare prompt (no context prefix): ([d_in], [d_out])."""
    idx = subject_last_index(lm.tokenizer, case.prompt, case.subject)
    k, v = module_io_at(lm, lm.adapter.mlp_name(layer), [case.rewrite_prompt], [idx])
    return k[0], v[0]


# --- target values --------------------------------------------------------------------------------------
@dataclass
class ValueOpt:
    """Hyper-parameters of the v* optimisation (ROME's compute_v / MEMIT's compute_z)."""

    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 5e-2
    most_probable_stop: bool = False    # ENCORE's MPES: stop once every target token is the argmax in every prompt


def _split_at_subject(tok, texts: Sequence[str], lookup: Sequence[int], device):
    """Split each text at its subject's last token: left-padded prefixes (which the edit cannot influence, the
    model being causal) and right-padded suffixes starting at the subject's last token.

    Returns prefix ids/mask/positions [n, P], suffix ids/mask/positions [n, S], suffix lengths."""
    pad = tok.pad_token_id
    seqs = [tok(t).input_ids for t in texts]
    P = max(lookup)
    S = max(len(s) - l for s, l in zip(seqs, lookup))
    n = len(seqs)
    pre_ids, pre_mask = pad_batch([s[:l] for s, l in zip(seqs, lookup)], pad, side="left", length=P)
    suf_ids, suf_mask = pad_batch([s[l:] for s, l in zip(seqs, lookup)], pad, length=S)
    pre_pos = torch.zeros((n, P), dtype=torch.long)
    suf_pos = torch.zeros((n, S), dtype=torch.long)
    suf_len = []
    for i, (s, l) in enumerate(zip(seqs, lookup)):
        pre_pos[i, P - l:] = torch.arange(l)
        suf_pos[i] = torch.arange(l, l + S)
        suf_len.append(len(s) - l)
    to = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    return (*to(pre_ids, pre_mask, pre_pos), *to(suf_ids, suf_mask, suf_pos), suf_len)


# --- objectives (Hase et al. 2023's editing problems; EditCase.objective) -------------------------------
def objective_loss(nll_each: torch.Tensor, objective: str) -> torch.Tensor:
    """The target term of an edit's loss from each prompt's mean token NLL of ``target_new`` [n] (a scalar).

    rewrite, amplify, force:  mean_i NLL_i                      (raise P(target_new); "force" differs only in its
                                                                 noised inputs)
    erase:                    mean_i -log(1 - p_i),  p_i = exp(-NLL_i)   (lower P(target_new); zero at p = 0)
    """
    if objective in ("rewrite", "amplify", "force"):
        return nll_each.mean()
    if objective == "erase":
        p = torch.exp(-nll_each).clamp(max=1 - 1e-6)
        return -torch.log1p(-p).mean()
    raise ValueError(f"unknown edit objective {objective!r}; use rewrite, amplify, erase or force")


def subject_first_index(tok, template: str, subject: str) -> int:
    """Index of the subject's first token in ``template.format(subject)``: the first token whose characters reach
    past the text before the subject (a space before the subject is usually merged into its first token)."""
    prefix = template[: template.index("{}")]
    try:
        offsets = tok(prefix + subject, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError, TypeError):   # slow tokenizers have no offsets
        return len(tok(prefix.rstrip()).input_ids)
    return next(i for i, (a, b) in enumerate(offsets) if b > len(prefix) and b > a)


def subject_noise(case: EditCase, lengths: Sequence[int], dim: int, device, dtype=torch.float32
                  ) -> list[torch.Tensor]:
    """Fixed Gaussian noise for the subject tokens of each prompt, [len_i, dim] each, std ``case.noise_std``,
    drawn from a private generator seeded with ``case.noise_seed`` (the same noise at every optimisation step)."""
    gen = torch.Generator().manual_seed(int(case.noise_seed))
    return [(case.noise_std * torch.randn(n, dim, generator=gen)).to(device=device, dtype=dtype) for n in lengths]


def _drop_suffix(cache, n: int, prefix_len: int) -> None:
    """Return a KV cache to its prefix of ``prefix_len`` positions: remove the ``n`` suffix positions from every
    layer that holds them (a pass from layer L on, ``layers_from``, only fills layers L..) and cut them from this
    step's graph."""
    layers = getattr(cache, "layers", None)                 # transformers >= 4.56 layout
    if layers is None:
        cache.crop(-n)
    for layer in layers or ():
        if layer.get_seq_length() > prefix_len:
            layer.crop(prefix_len - layer.get_seq_length())
        layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
    for attr in ("key_cache", "value_cache"):               # older layout
        if isinstance(getattr(cache, attr, None), list):
            setattr(cache, attr, [x.detach() for x in getattr(cache, attr)])


def optimize_value(lm: LoadedModel, case: EditCase, module_name: str, templates: Sequence[str],
                   opt: ValueOpt) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """v* = v + delta, where delta [d] added to ``module_name``'s output at the subject's last token makes the
    model predict ``target_new`` after every context template, while a KL term keeps the model's view of the
    subject ("{subject} is a") unchanged and weight decay keeps delta small (ROME section 3.1, eq. 4).

    ``optimize_values([case], ...)[0]``: the one implementation, which optimises several independent cases in one
    batch; for one case it is the computation this function always did, bit for bit.

    Returns (v* [d], v_init [d] at the bare prompt, diagnostics)."""
    return optimize_values(lm, [case], module_name, templates, opt)[0]


@contextlib.contextmanager
def add_to_subjects(module: torch.nn.Module, delta: torch.Tensor, n: int, rows: torch.Tensor, cols: torch.Tensor,
                    grid: tuple[int, int] | None = None):
    """Add case a's ``delta[a]`` (``delta`` [A, d]) to ``module``'s output at (row, col) positions, ``n`` consecutive
    positions per case (``rows``, ``cols`` [A * n]); ``info["init"]`` [A, d] keeps the first clean output vector of
    each case's positions (v at the case's unprefixed prompt). ``grid``: (b, T) of the forward pass's input, needed
    for modules that output flattened tokens [b * T, d] (``as_btd``); None: the output is [b, T, d]."""
    info: dict = {}

    def hook(_m, _inputs, output):
        raw = _first(output)                                        # [b, T, d] or [b * T, d]
        out = as_btd(raw, *grid) if grid is not None else raw       # [b, T, d]
        if "init" not in info:
            info["init"] = out[rows[::n], cols[::n]].detach().clone()   # [A, d]
        out = out.clone()
        A = delta.shape[0]
        out[rows, cols] = (out[rows, cols].view(A, n, -1) + delta[:, None].to(out.dtype)).view(A * n, -1)
        out = restore_shape(out, raw)                               # the module's own shape
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

    handle = module.register_forward_hook(hook)
    try:
        yield info
    finally:
        handle.remove()


def optimize_values(lm: LoadedModel, cases: Sequence[EditCase], module_name: str, templates: Sequence[str],
                    opt: ValueOpt) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    """v* = v + delta for each case, where delta [d] added to ``module_name``'s output at the subject's last token
    makes the model predict ``target_new`` after every context template, while a KL term keeps the model's view of
    the subject ("{subject} is a") unchanged and weight decay keeps delta small (ROME section 3.1, eq. 4):

        L_b(delta_b) = mean_j NLL(target_b | c_j + p_b; delta_b) + kl_factor KL("{s_b} is a"; delta_b vs 0)
                       + weight_decay ||delta_b|| / ||v_b||^2,        ||delta_b|| <= clamp_norm_factor ||v_b||

    Exactly the reference computation, made cheaper: tokens before the subject's last token never see delta
    (causal attention), so their keys/values are computed once and each step runs only the suffix; the layers
    below the edited module never see it either, so each step starts at the module's block.

    Several independent cases are optimised in one padded batch (their prompts stacked, case b's delta_b [d] a row
    of one parameter [B, d]) with the loss sum_b L_b: the gradient of row b depends on case b only, and Adam is
    elementwise, so every case follows its own optimisation. A case that stops (loss below ``early_stop_loss``,
    ENCORE's most-probable stop, or the last step) leaves the batch; its row is not moved again. Per case the
    result equals optimising it alone up to float rounding (padding and batch shape; tests/test_batch_values.py);
    a batch of one case is the single-case computation of before batching, bit for bit (v*, v_init, losses and steps
    compared with that code on tiny GPT-2 and Llama, fp32 and bf16, every objective, when this was written;
    tests/test_fidelity.py compares it with a port of ROME's compute_v).

    ``case.objective`` picks the target term (``objective_loss``): "erase" lowers P(target_new) instead; "force"
    adds fixed Gaussian noise (std ``case.noise_std``) to the subject's token embeddings of every rewriting prompt.

    Returns, per case, (v* [d], v_init [d] at the bare prompt, diagnostics)."""
    if not cases:
        return []
    tok, model = lm.tokenizer, lm.model
    for case in cases:                                   # an unknown objective fails before any forward pass
        objective_loss(torch.zeros(1), case.objective)
    B = len(cases)
    targets = [encode_target(tok, c.target_new) for c in cases]               # [t_b] per case
    kl_prompts = ["{} is a"]
    per_case = [[p + tok.decode(tg[:-1]) for p in prompts_in_templates(c, templates)] + kl_prompts
                for c, tg in zip(cases, targets)]                             # n prompt templates per case
    n_kl = len(kl_prompts)
    n = len(per_case[0])
    n_rw = n - n_kl
    # rows are case-major: case b's prompts are rows b*n .. b*n + n - 1 (its rewriting prompts, then the KL prompt)
    texts = [p.format(c.subject) for c, ps in zip(cases, per_case) for p in ps]
    lookup = [subject_last_index(tok, p, c.subject) for c, ps in zip(cases, per_case) for p in ps]
    pre_ids, pre_mask, pre_pos, suf_ids, suf_mask, suf_pos, suf_len = _split_at_subject(tok, texts, lookup, lm.device)
    full_mask = torch.cat([pre_mask, suf_mask], dim=1)                        # [B n, P + S]
    P, S = pre_ids.shape[1], suf_ids.shape[1]

    head, body = model.get_output_embeddings(), model.base_model
    pre_in: dict = {"input_ids": pre_ids}
    suf_in: dict = {"input_ids": suf_ids}
    if any(c.objective == "force" for c in cases):       # noise the subject's tokens of the rewriting prompts
        embed = model.get_input_embeddings()
        with torch.no_grad():
            pre_emb, suf_emb = embed(pre_ids).clone(), embed(suf_ids).clone()   # [B n, P, d], [B n, S, d]
        for b, case in enumerate(cases):
            if case.objective != "force":
                continue
            r0 = b * n
            firsts = [subject_first_index(tok, p, case.subject) for p in per_case[b][:n_rw]]
            lengths = [lookup[r0 + i] + 1 - firsts[i] for i in range(n_rw)]
            noise = subject_noise(case, lengths, pre_emb.shape[-1], lm.device, pre_emb.dtype)
            for i in range(n_rw):                         # prefix column of token j is P - lookup + j
                m = lookup[r0 + i] - firsts[i]
                if m:
                    pre_emb[r0 + i, P - m:] += noise[i][:m]
                suf_emb[r0 + i, 0] += noise[i][m]         # the subject's last token starts the suffix
        pre_in, suf_in = {"inputs_embeds": pre_emb}, {"inputs_embeds": suf_emb}
    cache = None
    if P:
        with torch.no_grad():
            cache = returned_cache(body(**pre_in, attention_mask=pre_mask, position_ids=pre_pos, use_cache=True))

    # the blocks below the edited module's never see delta: their output for the suffix is computed once, and
    # every step runs the model from the module's block on (``layers_from``: bit-identical to the full pass,
    # tests/test_speed.py); families it does not support take the full pass
    start = lm.adapter.layer_of(module_name) if supports_layers_from(model, lm.adapter) else None
    step_in = suf_in
    if start and (cache is None or hasattr(cache, "layers")):
        with torch.no_grad(), block_input(model, lm.adapter, start) as below:
            body(**suf_in, attention_mask=full_mask, position_ids=suf_pos, **cache_arg(body, cache),
                 use_cache=cache is not None)
        if cache is not None:
            _drop_suffix(cache, S, P)
        step_in = {"inputs_embeds": below["hidden"]}
    else:
        start = None

    dev = lm.device
    active = list(range(B))                 # the cases still optimised; the batch holds their rows, in this order

    def layout(active: list[int]) -> dict[str, torch.Tensor]:
        """Where each active case's losses are read, in the batch of the active cases' rows (suffix coordinates:
        the subject's last token is column 0). Rewriting prompt i ends with target[:-1], so target token j is
        predicted by the logits at column suf_len - t + j (the reference's rewriting_targets[i, ex_len - t :
        ex_len] = target_ids, in full-sequence coordinates)."""
        rows, cols, ids, ends = [], [], [], [0]
        for a, b in enumerate(active):
            t = len(targets[b])
            for i in range(n_rw):
                rows += [a * n + i] * t
                cols += [suf_len[b * n + i] - t + j for j in range(t)]
            ids += targets[b] * n_rw
            ends.append(len(rows))
        A = len(active)
        return {"tgt_rows": torch.tensor(rows, device=dev), "tgt_cols": torch.tensor(cols, device=dev),
                "tgt_ids": torch.tensor(ids, device=dev), "ends": ends,
                "kl_rows": (torch.arange(A, device=dev)[:, None] * n + n_rw
                            + torch.arange(n_kl, device=dev)).reshape(-1),
                "kl_cols": torch.zeros(A * n_kl, dtype=torch.long, device=dev),
                "all_rows": torch.arange(A * n, device=dev), "col0": torch.zeros(A * n, dtype=torch.long, device=dev)}

    at = layout(active)
    module = model.get_submodule(module_name)
    delta = optimizer = v_init = None       # delta [B, d]: row b is case b's; v_init [B, d]
    init_kl: list = [None] * B              # [n_kl, V] per case: the KL prompt's distribution at delta = 0
    losses: list[list[float]] = [[] for _ in range(B)]
    most_probable: list[list[bool]] = [[] for _ in range(B)]
    stopped: dict[int, torch.Tensor] = {}   # case -> its delta row when it stopped (never moved again)
    for it in range(opt.steps):
        if delta is None:   # created once the module's output width is known (the first forward pass)
            with torch.no_grad(), capture_io(module) as io:
                body(input_ids=suf_ids[:1, :1], position_ids=suf_pos[:1, :1])
            delta = torch.zeros(B, io["output"].shape[-1], device=dev, dtype=torch.float32, requires_grad=True)
            optimizer = torch.optim.Adam([delta], lr=opt.lr)
        rows_delta = delta if len(active) == B else delta[torch.tensor(active, device=dev)]   # [A, d]
        grid = token_grid(next(iter(step_in.values())))                # (A n, S) of this step's pass
        with add_to_subjects(module, rows_delta, n, at["all_rows"], at["col0"], grid) as info, \
                (layers_from(model, lm.adapter, start) if start else contextlib.nullcontext()):
            hidden = body(**step_in, attention_mask=full_mask, position_ids=suf_pos,
                          **cache_arg(body, cache), use_cache=cache is not None).last_hidden_state  # [A n, S, d_model]
        if cache is not None:
            _drop_suffix(cache, S, P)
        if v_init is None:                  # the clean values at the bare prompts (each case's row 0, "{}")
            v_init = info["init"].float()
        # logits only where needed (target and KL positions), never [A n, S, V]
        logp = F.log_softmax(head(hidden[at["tgt_rows"], at["tgt_cols"]]).float(), dim=-1)  # [sum_b n_rw t_b, V]
        nll = -logp.gather(1, at["tgt_ids"][:, None]).squeeze(1)
        kl_logp = F.log_softmax(head(hidden[at["kl_rows"], at["kl_cols"]]).float(), dim=-1)  # [A n_kl, V]
        going, total = [], None
        for a, b in enumerate(active):
            objective, t = cases[b].objective, len(targets[b])
            part = slice(at["ends"][a], at["ends"][a + 1])
            nll_loss = objective_loss(nll[part].view(n_rw, t).sum(1).div(t), objective)   # [n_rw] mean NLL
            kl_b = kl_logp[a * n_kl:(a + 1) * n_kl]
            if init_kl[b] is None:
                init_kl[b] = kl_b.detach().clone()
            kl_loss = opt.kl_factor * F.kl_div(init_kl[b], kl_b, log_target=True, reduction="batchmean")
            wd = opt.weight_decay * (rows_delta[a].norm() / v_init[b].norm() ** 2)
            loss = nll_loss + kl_loss + wd
            losses[b].append(round(loss.item(), 4))
            if opt.most_probable_stop:      # MPES (Gupta et al., 2025): the current delta makes target_new top-1
                most_probable[b].append(bool((logp[part].argmax(-1) == at["tgt_ids"][part]).all()))
            # the early stop is an NLL threshold (P(target) ~ 0.95); an erasure's -log(1 - p) starts below it when
            # p is already small, so erasure runs every step
            if ((objective != "erase" and loss.item() < opt.early_stop_loss) or it == opt.steps - 1
                    or (most_probable[b] and most_probable[b][-1] and objective != "erase")):
                stopped[b] = delta[b].detach().clone()
                continue
            going.append(b)
            total = loss if total is None else total + loss          # sum_b L_b: row b's gradient is L_b's
        if not going:
            break
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        with torch.no_grad():
            for b, row in stopped.items():  # Adam's momentum would move a stopped case's row: put it back
                delta[b].copy_(row)
            for b in going:                 # keep ||delta_b|| <= clamp * ||v_b||
                max_norm = opt.clamp_norm_factor * v_init[b].norm()
                if delta[b].norm() > max_norm:
                    delta[b].mul_(max_norm / delta[b].norm())
        if len(going) < len(active):        # the stopped cases leave the batch
            keep = torch.tensor([a * n + r for a, b in enumerate(active) if b in going for r in range(n)],
                                device=dev)
            if cache is not None:
                cache.batch_select_indices(keep)
            S = max(suf_len[b * n + r] for b in going for r in range(n))        # the longest suffix left
            step_in = {k: v[keep][:, :S].contiguous() for k, v in step_in.items()}
            suf_pos, full_mask = suf_pos[keep][:, :S], full_mask[keep][:, :P + S]
            active = going
            at = layout(active)
    out = []
    for b, case in enumerate(cases):
        info = {"v_loss": losses[b], "v_steps": len(losses[b]), "delta_norm": delta[b].norm().item(),
                "v_init_norm": v_init[b].norm().item()}
        if case.objective != "rewrite":
            info["objective"] = case.objective
        if opt.most_probable_stop:
            info["most_probable"] = most_probable[b]
        out.append(((v_init[b] + delta[b]).detach(), v_init[b].detach().clone(), info))
    return out


class ValuesAhead:
    """The owner of target values optimised ahead of their edits (``--vstar-batch K`` in the single-edit suites),
    held by the editor. When the run says (``expect``) that after the edit of case c_1 it will edit c_2 .. c_K, each
    alone and from the model as it is now (single edits, each restored before the next), the v* of all K are
    optimised in one batch (``optimize_values``) at c_1's edit, and each later case's edit takes its own.

    A held value is used only for the same case, module, context templates and settings, and only while the model is
    bit-identical to the one it was computed on: every parameter but the editor's own edited ones not written since
    (same storage, same version counter), and those (which a restore writes back) of the same SHA-256 digest.
    Anything else drops what is held and computes afresh, alone or with the cases expected next. (A write through
    ``.data`` bumps no version counter and would not be seen; the harness writes parameters in place, as
    ``editing.structure`` also assumes.)

    Timing: the batch's cost (``clock``, the caller's timer clock) is shared equally by its cases. ``settle()``
    after each edit says what to move: (this case's share, the seconds the batch took inside this edit, batch size).
    """

    def __init__(self, batch: int = 1) -> None:
        self.batch = batch                              # K; 1: nothing ahead, every v* alone
        self.clock: Callable[[], float] = time.perf_counter
        self._expected: list[EditCase] = []
        self._held: dict[str, tuple] = {}               # case id -> (case, key, model state, result, share, K)
        self._settle: tuple[float, float, int] | None = None

    def expect(self, cases: Sequence[EditCase], clock: Callable[[], float] | None = None) -> None:
        """The next single edits from the model as it is: ``cases[0]`` now, then the others in order."""
        self._expected = list(cases)
        if clock is not None:
            self.clock = clock

    def settle(self) -> tuple[float, float, int] | None:
        """After an edit: (share of a batch's seconds this edit's case owes, seconds of that batch spent inside this
        edit, batch size), or None when its v* was not part of a batch; then forgotten."""
        out, self._settle = self._settle, None
        return out

    @staticmethod
    def _state(lm: LoadedModel, edited: Sequence[str]) -> tuple:
        params = [(n, p.data_ptr(), p._version) for n, p in lm.model.named_parameters() if n not in edited]
        return id(lm.model), params, param_digest(lm.model, list(edited))

    def value(self, lm: LoadedModel, case: EditCase, module_name: str, templates: Sequence[str], opt: ValueOpt,
              edited: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``optimize_value(lm, case, ...)``, from what is held when valid, else computed now together with the
        cases expected after ``case`` (up to ``batch`` in all). ``edited``: the parameters the editor writes."""
        key = (module_name, tuple(templates), dataclasses.astuple(opt))
        expected, self._expected = self._expected, []
        held = self._held.pop(case.case_id, None)
        if held is not None and held[0] == case and held[1] == key and held[2] == self._state(lm, edited):
            self._settle = (held[4], 0.0, held[5])
            return held[3]
        self._held.clear()
        batch = [case]
        if self.batch > 1 and expected and expected[0] == case:
            batch += [c for c in expected[1:self.batch] if c.case_id not in {b.case_id for b in batch}]
        if len(batch) == 1:
            return optimize_values(lm, batch, module_name, templates, opt)[0]
        state = self._state(lm, edited)
        sync = torch.cuda.synchronize if torch.device(lm.device).type == "cuda" else (lambda: None)
        sync()
        t0 = self.clock()
        results = optimize_values(lm, batch, module_name, templates, opt)
        sync()
        cost = self.clock() - t0
        share = cost / len(batch)
        for c, r in zip(batch[1:], results[1:]):
            self._held[c.case_id] = (c, key, state, r, share, len(batch))
        self._settle = (share, cost, len(batch))
        return results[0]

    def charge(self, timer, edit) -> None:
        """After an edit (``harness.editing.edited``): if its v* came from a batch of K cases optimised together,
        its "edit" time counts its share of the batch's seconds, not what the batch took inside it (all of it for the
        edit that ran the batch, none for the others), and the record says so (``v_batch``, ``v_batch_share_s``)."""
        batch = self.settle()
        if batch is not None:
            share, spent, size = batch
            timer.seconds["edit"] = timer.seconds.get("edit", 0.0) - spent + share
            edit.info.update(v_batch=size, v_batch_share_s=share)


class AheadPlan:
    """The owner of ``--vstar-batch K`` for the session: the single edits this process will run, in order (each
    from the unedited model: the single-edit, HardEdit and locality tests after collection), which of them follow
    an edit (``next``), and telling an editor that declares ``Capabilities.values_ahead`` (its ``ValuesAhead``,
    ``editor.ahead``) so that it optimises their v* together (``expect``). The time a batch took is shared among its
    cases by ``ValuesAhead.charge`` when each edit ends (``charge``). Editors that do not declare ``values_ahead``
    are left alone."""

    def __init__(self, batch: int = 1) -> None:
        self.batch = max(1, int(batch or 1))
        self._plan: dict[str, list[EditCase]] = {}      # editor -> its planned single edits, in run order
        self._cursor: dict[str, int] = {}                # editor -> where its next planned edit is looked for

    @staticmethod
    def applies(editor) -> bool:
        return bool(editor.capabilities.values_ahead) and getattr(editor, "ahead", None) is not None

    def configure(self, editor) -> None:
        """A new editor instance: its ``ValuesAhead`` optimises up to K values together."""
        if self.applies(editor):
            editor.ahead.batch = self.batch

    def plan(self, order: Sequence[tuple[str, EditCase]]) -> None:
        """(editor name, case) of the single edits this process will run, in order (none under xdist)."""
        self._plan, self._cursor = {}, {}
        for name, case in order:
            self._plan.setdefault(name, []).append(case)

    def next(self, editor_name: str, case: EditCase, k: int) -> list[EditCase]:
        """The ``k`` single edits planned for ``editor_name`` after this one of ``case`` (found at or after the last
        one asked for; [] when ``case`` is not in the plan)."""
        plan = self._plan.get(editor_name, [])
        start = self._cursor.get(editor_name, 0)
        at = next((i for i in range(start, len(plan)) if plan[i] == case), None)
        if at is None:
            return []
        self._cursor[editor_name] = at + 1
        return plan[at + 1:at + 1 + k]

    def expect(self, editor, case: EditCase, clock: Callable[[], float] | None = None) -> None:
        """Before the single edit of ``case``: tell the editor the next K - 1 planned after it."""
        if self.applies(editor) and editor.ahead.batch > 1:
            editor.ahead.expect([case, *self.next(editor.name, case, editor.ahead.batch - 1)], clock)

    @classmethod
    def before_edit(cls, editor) -> None:
        """Nothing left over from an edit that failed."""
        if cls.applies(editor):
            editor.ahead.settle()

    @classmethod
    def charge(cls, editor, timer, edit) -> None:
        """After the edit: its share of a batch's time (``ValuesAhead.charge``)."""
        if cls.applies(editor):
            editor.ahead.charge(timer, edit)
