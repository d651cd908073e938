"""Session: one opened bundle (encoders, projector, LLM) shared by its conversations.

    session = Session.open("bundle/")
    chat = session.chat()
    for piece in chat.send("What is in the picture?", images=["cat.jpg"]):
        print(piece, end="")

The KV cache belongs to the session: `parallel` sequences in one llama.cpp context, each
a slot that a conversation's reply is placed in (runtime/batch.py). A conversation is a
list of messages; its reply decodes only past the longest prefix a slot (or a snapshot)
already holds, so the system prompt is computed once per session and a new turn decodes
only what is new. Several conversations of one session generate at once, their decode
steps batched together:

    session = Session.open("bundle/", parallel=4)
    a, b = session.chat(), session.chat()
    ra, rb = a.send("Describe it.", images=["cat.jpg"]), b.send("Hello!")
    ra.start(), rb.start()
    print(rb.result().text, ra.result().text)     # or read each from its own thread
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .batch import DEFAULT_PREFILL_CHUNK, Scheduler
from .bundle import Bundle, open_bundle
from . import gpu
from .encode import CPU, ModalityEncoder, pick_providers, short
from .errors import BundleError, OptionError, UnsupportedModality
from .instruction import InstructionTokenizer
from .llm import Llm, LlmOptions
from .memory import GIB, check_fits
from .modalities import KINDS
from .preprocess import content_hash
from .project import load_projector, projector_stage
from .residency import Encoders
from .template import MediaRef, render, to_cells

log = logging.getLogger("scops")

MEDIA_CACHE_ITEMS = 128       # bridge rows are small (32 x 768 fp32 = 96 KiB per image)
ANSWER_MEMORY_ITEMS = 1024    # generated ids of recent answers (a few hundred ints each)


@dataclass(frozen=True)
class Prepared:
    """A media input reduced to its first encoder stage's batch (the decoded original is
    gone): what the server keeps of a 16 MP upload is 0.6 MB, not 48 MB."""
    modality: str
    key: str                         # content hash of the decoded input (the media-cache key)
    batch: np.ndarray
    facts: dict                      # what decoding learnt (size, duration): grounding maps back with it


@dataclass(frozen=True)
class SessionOptions:
    n_ctx: int = 2048
    n_batch: int = 512
    threads: int = 0                 # 0: one per core
    device: str = "auto"             # auto: the GPU when one is there | cpu | cuda (a GPU is required)
    n_gpu_layers: int | None = None  # None: every layer when llama.cpp has a GPU backend and device allows
    # KV cache precision. "auto": an F32 bundle gets "f32" with flash attention off (its
    # greedy tokens then follow PyTorch fp32 exactly; f16 K/V drift after a dozen tokens),
    # every other bundle "f16" (half the memory).
    kv_type: str = "auto"            # "auto" | "f16" | "f32" | "q8_0" (auto: q8_0 in the low-memory profile)
    flash_attn: str = "auto"         # "auto" | "on" | "off"
    providers: tuple | None = None   # onnxruntime providers, best first; None: auto
    projector_backend: str = "auto"  # auto | cuda | cpu | numpy
    verify: bool = True              # sha256 of every bundle file at open
    warmup: bool = True              # one encoder + decode pass at open (decode only with lazy encoders)
    # Memory (the low-memory profile below sets these; each may also be given alone).
    low_memory: bool = False         # the profile was asked for (Session.open(low_memory=True))
    onnx_arena: bool = True          # onnxruntime's CPU memory arena (off: freed after each run)
    lazy_encoders: bool = False      # build an encoder's ONNX sessions at its first use, not at open
    encoder_idle_s: float = 0.0      # > 0: drop an encoder idle this many seconds (memory handed back)
    encoder_precision: str | None = None  # e.g. "int8": that variant of each ONNX stage, where the bundle has one
    n_ctx_start: int = 0             # > 0: the KV cache starts this small and grows with the conversation
    weight_repack: bool = True       # llama.cpp's CPU repacking of weights: a second copy (runtime/llm.py)
    check_memory: bool = True        # refuse at open a bundle needing more memory than is available
    grounding: bool = True           # run a bundle's grounding stages (BuboGPT) beside the chat
    matcher: str = "llm"             # "llm": the bundle's LLM links phrases (rules when it fails) | "rules"
    parallel: int = 1                # conversations generating at once (llama.cpp sequences)
    snapshots: int = 0               # KV copies kept of conversations that lost their slot
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK   # prompt cells per step while others stream
    history: str = "ids"             # answers in the next prompt: "ids" as generated | "text" re-tokenized
    overflow: str = "drop"           # a prompt outgrowing n_ctx: "drop" oldest turns | "error"


# The low-memory profile (`--low-memory`, Session.open(..., low_memory=True)) for boards with
# 8 GB shared by everything: options given explicitly still win over these (and kv_type
# "auto" means q8_0 in it).
LOW_MEMORY = dict(
    onnx_arena=False,
    lazy_encoders=True,
    encoder_idle_s=30.0,             # a follow-up question within 30 s does not reload the ViT
    encoder_precision="int8",
    n_ctx_start=512,                 # a first image turn (system + 32 rows + question + answer) fits
    weight_repack=False,             # 7B Q4_K_M: 4.1 instead of 7.0 GiB resident for the LLM
)


@dataclass
class Stats:
    encoder_runs: int = 0            # media items that went through the encoders
    media_cache_hits: int = 0


def media_batch(n_batch: int, manifest: dict) -> int:
    """llama.cpp's batch size: at least n_batch and at least the rows of the largest media
    item, so that one picture is one llama_decode (LEGO's 576 rows at n_batch 512 were 512 + 64:
    measured in README "LEGO's image turn")."""
    return max([n_batch] + [int(m.get("rows", 0)) for m in manifest.get("modalities", {}).values()])


def resolve_kv(opts: SessionOptions, quant: str) -> tuple[str, str]:
    """(kv_type, flash_attn) for llama.cpp: exact by default where the user asked for exact."""
    if opts.kv_type not in ("auto", "f16", "f32", "q8_0"):
        raise OptionError(f"kv_type must be auto, f16, f32 or q8_0, not {opts.kv_type!r}")
    # low memory: q8_0 is 0.53x of f16 (llm.py falls back to f16 where llama.cpp refuses it)
    auto = "q8_0" if opts.low_memory else ("f32" if quant == "F32" else "f16")
    kv = opts.kv_type if opts.kv_type != "auto" else auto
    flash = opts.flash_attn
    if flash == "auto" and kv == "f32":
        flash = "off"           # llama.cpp's CPU flash attention rounds Q/K/V to f16
    return kv, flash


class Session:
    def __init__(self, bundle: Bundle, opts: SessionOptions):
        self.bundle = bundle
        self.opts = opts
        self.stats = Stats()
        if opts.device not in ("auto", "cpu", "cuda"):
            raise OptionError(f"device must be auto, cpu or cuda, not {opts.device!r}")
        gpus = gpu.cuda_devices() if opts.device != "cpu" else ()
        if opts.device == "cuda" and not gpus:
            raise BundleError("--device cuda: no NVIDIA GPU is visible (no driver, or CUDA_VISIBLE_DEVICES hides it)")
        kv_type = resolve_kv(opts, bundle.manifest["llm"]["quant"])[0]
        self.memory_need = check_fits(bundle, opts, kv_type) if opts.check_memory else None
        cache_root = Path(os.environ.get("SCOPS_CACHE") or Path.home() / ".cache" / "scops")
        self.providers = pick_providers((CPU,) if opts.device == "cpu" else opts.providers)
        shared = weakref.WeakValueDictionary()     # modalities running the same graph share its session
        self.encoders = Encoders(
            lambda m: ModalityEncoder(bundle, m, self.providers, opts.threads, cache_root, opts.onnx_arena,
                                      opts.encoder_precision, shared),
            bundle.modalities, lazy=opts.lazy_encoders, idle_s=opts.encoder_idle_s)
        self.projectors = {}
        proj_backend = "cpu" if opts.device == "cpu" and opts.projector_backend == "auto" else opts.projector_backend
        loaded: dict = {}              # modalities sharing one projector file share one Projector
        for m in bundle.modalities:
            stage = projector_stage(bundle, m)
            key = json.dumps(stage, sort_keys=True)
            if key not in loaded:
                loaded[key] = load_projector(bundle, stage, proj_backend, opts.threads)
            self.projectors[m] = loaded[key]
        if opts.parallel < 1 or opts.snapshots < 0 or opts.prefill_chunk < 1:
            raise OptionError("parallel and prefill_chunk must be >= 1, snapshots >= 0")
        self.llm = self._open_llm(bool(gpus))
        if self.llm.n_embd != int(bundle.manifest["llm"]["n_embd"]):
            msg = f"{bundle.llm_path.name}: n_embd {self.llm.n_embd} != manifest {bundle.manifest['llm']['n_embd']}"
            self.llm.close()
            raise BundleError(msg)
        self._pinned = self._pin_embd()
        self.grounder = None
        if opts.grounding and isinstance(bundle.manifest.get("grounding"), dict):    # stages beside the chat
            from .grounding_pipeline import Grounder
            self.grounder = Grounder(bundle, self.providers, opts.threads,
                                     self.llm if opts.matcher == "llm" else None)
        self._media: OrderedDict = OrderedDict()     # key -> (modality, bridge rows [Q, D])
        self.facts: OrderedDict = OrderedDict()      # key -> what decoding learnt (size, duration, source)
        # input key -> instruction-free stage outputs (kept only where a Q-Former reads the question)
        self._base: OrderedDict = OrderedDict()
        instr = bundle.modalities.get("image", {}).get("instruction")
        self.instruction_tok = InstructionTokenizer(bundle, instr) if instr else None
        self._lock = threading.Lock()                # media caches, stats, answers: several senders
        self._answers: OrderedDict = OrderedDict()   # answer key -> generated ids (history="ids")
        self.scheduler = Scheduler(self.llm, opts.snapshots, opts.prefill_chunk)
        log.info("backends: %s", self.describe_backends())
        if opts.low_memory:
            log.info("low-memory profile: onnx arena %s, weight repacking %s, encoders %s%s, %s, KV %s, "
                     "n_ctx %d growing to %d%s", "on" if opts.onnx_arena else "off",
                     "on" if opts.weight_repack else "off", "lazy" if opts.lazy_encoders else "at open",
                     f" dropped after {opts.encoder_idle_s:g} s idle" if opts.encoder_idle_s > 0 else "",
                     opts.encoder_precision or "bundle precision", self.llm.kv_type, self.llm.n_ctx,
                     self.llm.n_ctx_max, f"; estimated peak {self.memory_need['total'] / GIB:.1f} GiB"
                     if self.memory_need else "")
        if opts.warmup:
            self._warmup()

    def _open_llm(self, have_gpu: bool) -> Llm:
        """All layers on the GPU when llama.cpp was built with one and a GPU is there; a GPU
        load that fails (out of memory, a broken driver) falls back to the CPU with a warning."""
        import llama_cpp

        o = self.opts
        layers = o.n_gpu_layers
        if layers is None:
            layers = -1 if have_gpu and llama_cpp.llama_supports_gpu_offload() else 0
        if layers != 0:
            gpu.preload_cuda_libraries()
        args = (o.n_ctx, media_batch(o.n_batch, self.bundle.manifest), o.threads)
        kv_type, flash_attn = resolve_kv(o, self.bundle.manifest["llm"]["quant"])
        try:
            llm = Llm(str(self.bundle.llm_path), LlmOptions(*args, layers, kv_type, flash_attn, o.n_ctx_start, o.parallel,
                                                            repack=o.weight_repack))
        except BundleError as e:
            if layers == 0:
                raise
            log.warning("llama.cpp could not load the model onto the GPU (%s); loading it on the CPU", e)
            layers = 0
            llm = Llm(str(self.bundle.llm_path), LlmOptions(*args, 0, kv_type, flash_attn, o.n_ctx_start, o.parallel,
                                                            repack=o.weight_repack))
        llm.gpu_layers = layers
        return llm

    def _pin_embd(self):
        """With a CUDA projector, llama_batch.embd lives in pinned memory (one DMA per splice)."""
        if not any(p.backend == "cuda" for p in self.projectors.values()):
            return None
        from scops.kernels import KernelError, PinnedBuffer
        try:
            buf = PinnedBuffer.allocate(self.llm.n_batch * self.llm.n_embd)
        except KernelError as e:
            log.warning("pinned memory for the projector's output unavailable (%s); using pageable memory", e)
            return None
        self.llm.set_embd_buffer(buf.array)
        return buf

    def describe_backends(self) -> str:
        """One line naming every backend in use: each graph's provider, the projector, llama.cpp."""
        stages = {id(st): st for enc in self.encoders.values() for st in enc.base + enc.rest}   # shared once
        graphs = ", ".join(f"{st.name} {short(st.backend)}" for st in stages.values() if hasattr(st, "backend"))
        proj = ",".join(sorted({p.backend for p in self.projectors.values()}))
        if self._pinned is not None:
            proj += " (pinned embd)"
        n_layer = self.llm.L.llama_model_n_layer(self.llm.model)
        if self.llm.gpu_layers != 0:
            devs = gpu.llama_devices()
            where = ", ".join(f"{n} {d}" for n, d in devs) or "GPU"
            on = n_layer if self.llm.gpu_layers < 0 else min(self.llm.gpu_layers, n_layer)
            llm = f"llama.cpp {where}: {on}/{n_layer} layers offloaded"
        else:
            llm = f"llama.cpp CPU, {self.llm.threads} threads"
        return f"onnxruntime {graphs}; projector {proj}; {llm}; n_ctx {self.llm.n_ctx} x {self.llm.n_seq} sequences"

    @classmethod
    def open(cls, path, low_memory: bool = False, **options) -> "Session":
        opts = SessionOptions(**{**(LOW_MEMORY if low_memory else {}), **options, "low_memory": low_memory})
        return cls(open_bundle(path, verify=opts.verify), opts)

    def chat(self, system: str | None = None, history: str | None = None, overflow: str | None = None):
        """A new conversation (history / overflow: see runtime/chat.py; default: the session's)."""
        from .chat import Conversation
        return Conversation(self, system, history, overflow)

    # ---- answers as generated ------------------------------------------------------------
    def remember_answer(self, key: str, ids) -> None:
        with self._lock:
            self._answers[key] = tuple(ids)
            self._answers.move_to_end(key)
            while len(self._answers) > ANSWER_MEMORY_ITEMS:
                self._answers.popitem(last=False)

    def recall_answer(self, key: str):
        with self._lock:
            return self._answers.get(key)

    def generate_image(self, prompt: str, images=(), **options):
        """Emu: prompt (+ reference pictures) -> GeneratedImage; options: steps, guidance, height,
        width, seed, latents, progress(done, total). See runtime/imagine.py."""
        from .imagine import generate_image
        return generate_image(self, prompt, images, **options)

    # ---- media --------------------------------------------------------------------
    def _warmup(self) -> None:
        """First-call costs (graph init, allocations) paid at open, not in the first turn."""
        warm: set = set()
        for m, enc in self.encoders.items():
            if {id(st) for st in enc.base + enc.rest} <= warm:     # the same graphs as a warmed modality
                continue
            warm |= {id(st) for st in enc.base + enc.rest}
            shape = [d if isinstance(d, int) else 1 for d in enc.base[0].shape]
            base = enc.encode_base(np.zeros(shape, np.float32))
            instr = self.instruction_tok.encode("warm up") if enc.uses_instruction else None
            rows = enc.encode_rows(base, instr)[0]
            self.projectors[m].forward(np.ascontiguousarray(rows))
        tpl = self.bundle.template
        system = to_cells(render(tpl, [], cue=False), self.llm.tokenize, None, tpl.get("bos", True))
        system = system or self.llm.tokenize("", True)                       # empty system: BOS alone
        self.llm.sync(system, fill=None)
        for seq in range(1, self.llm.n_seq):         # every slot starts with it (cells shared)
            self.llm.copy_prefix(0, seq, len(system))

    def _kind(self, modality: str):
        if modality not in self.encoders:
            raise UnsupportedModality(f"this {self.bundle.family} bundle takes no {modality} input "
                                      f"(it serves: {', '.join(self.encoders)})")
        return KINDS[modality], self.bundle.modalities[modality]["preprocess"]

    def prepare_media(self, modality: str, source) -> Prepared:
        """Decode one input, hash it and reduce it to the first encoder stage's batch at once
        (the decoded original is dropped here). Thread-safe; the server runs it in a pool."""
        kind, spec = self._kind(modality)
        decoded = kind.decode(source, spec)
        key = f"{modality}:{kind.key(decoded)}"
        if modality == "image" and self.grounder is not None:
            self.grounder.submit(key, decoded)       # grounding needs the picture itself (BuboGPT)
        return Prepared(modality, key, kind.prepare(decoded, spec), kind.facts(decoded))

    def encode_media(self, modality: str, sources, instruction: str = "") -> tuple[list[MediaRef], dict]:
        """Decode, hash, and (unless cached) prepare + encode; returns refs and timings."""
        refs, _, timings = self.encode_media_rows(modality, sources, instruction)
        return refs, timings

    def encode_media_rows(self, modality: str, sources, instruction: str = "") -> tuple[list[MediaRef], dict, dict]:
        """As encode_media, plus {ref key: (modality, rows)} of what it returns (held here, so
        that another thread's inputs cannot evict them from the cache in between).
        Sources may be files/bytes/arrays or `Prepared` inputs (decoded and reduced already).

        A text-conditioned Q-Former (InstructBLIP) also reads `instruction`: its rows are
        keyed by input and instruction, the instruction-free base (ViT output) by input.
        """
        kind, spec = self._kind(modality)
        enc = None                                   # built on first use (lazy encoders)
        uses_instruction = self.encoders.fact(modality, "uses_instruction")
        t0 = time.perf_counter()
        items, facts = [], []                                        # (base key, decoded, batch)
        for src in sources:
            if isinstance(src, Prepared):
                if src.modality != modality:
                    raise OptionError(f"a prepared {src.modality} input was given as {modality}")
                items.append((src.key, None, src.batch))
                facts.append(src.facts)
            else:
                decoded = kind.decode(src, spec)
                items.append((f"{modality}:{kind.key(decoded)}", decoded, None))
                facts.append(dict(kind.facts(decoded), **({"source": str(src)} if isinstance(src, (str, Path)) else {})))
        salt = "|q:" + content_hash(np.frombuffer(instruction.encode(), np.uint8)) if uses_instruction else ""
        refs = [MediaRef(modality, k + salt) for k, _, _ in items]
        # per_frame (Emu's video): frame i of an input is the slot "<key>#i", rows [Q, D] each
        per_frame = bool(self.bundle.modalities[modality].get("per_frame"))
        slots = {r.key: [f"{r.key}#{i}" for i in range(len(d[0]) if d is not None else len(b))] if per_frame
                 else [r.key] for r, (_, d, b) in zip(refs, items)}
        with self._lock:                          # geometry for grounding (size, duration)
            for ref, f in zip(refs, facts):
                for i, slot in enumerate(slots[ref.key]):
                    self.facts[slot] = dict(f, frame=i) if per_frame else f
                    self.facts.move_to_end(slot)
            while len(self.facts) > MEDIA_CACHE_ITEMS:
                self.facts.popitem(last=False)
        if modality == "image" and self.grounder is not None:
            for ref, (_, decoded, _) in zip(refs, items):   # starts now, in the grounding worker
                if decoded is not None:                     # (a Prepared one was submitted by prepare_media)
                    self.grounder.submit(ref.key, decoded)
        t_enc = 0.0
        got: dict = {}
        for ref, (k, decoded, batch) in zip(refs, items):
            with self._lock:
                cached = [self._media.get(slot) for slot in slots[ref.key]]
                hit = all(c is not None for c in cached)
                if hit:
                    got.update(zip(slots[ref.key], cached))
                self.stats.media_cache_hits += hit
                base = self._base.get(k)
            if hit:
                continue
            if enc is None:                  # built here if lazy or dropped: that time counts as encoding
                t1 = time.perf_counter()
                enc = self.encoders[modality]
                t_enc += time.perf_counter() - t1
            if base is None:
                if batch is None:
                    batch = kind.prepare(decoded, spec)                # [N, ...]: N clips / crops / 1
                t1 = time.perf_counter()
                base = enc.encode_base(batch)
                t_enc += time.perf_counter() - t1
                with self._lock:
                    self.stats.encoder_runs += 1
                    if uses_instruction:         # only then is the base needed again (a new question)
                        self._base[k] = base
                        while len(self._base) > MEDIA_CACHE_ITEMS:
                            self._base.popitem(last=False)
            t1 = time.perf_counter()
            instr = self.instruction_tok.encode(instruction) if uses_instruction else None
            rows = enc.encode_rows(base, instr)                         # [N, Q, D]
            for slot, r in zip(slots[ref.key], rows):                   # [Q, D] each: N slots or the first
                got[slot] = (modality, np.ascontiguousarray(r))
                self._remember(slot, *got[slot])
            t_enc += time.perf_counter() - t1
        with self._lock:
            for r, (k, _, _) in zip(refs, items):
                for slot in slots[r.key]:
                    if slot in self._media:
                        self._media.move_to_end(slot)
                if k in self._base:
                    self._base.move_to_end(k)
        total = time.perf_counter() - t0
        out = [MediaRef(modality, slot) for r in refs for slot in slots[r.key]]
        return out, got, {"preprocess_ms": (total - t_enc) * 1e3, "encode_ms": t_enc * 1e3}

    def _remember(self, key: str, modality: str, rows: np.ndarray) -> None:
        with self._lock:
            self._media[key] = (modality, rows)
            while len(self._media) > MEDIA_CACHE_ITEMS:
                self._media.popitem(last=False)

    def media_rows(self, key: str):
        with self._lock:
            return self._media.get(key)

    def media_facts(self, key: str) -> dict:
        with self._lock:
            return self.facts.get(key, {})

    def close(self) -> None:
        self.scheduler.close()
        self.encoders.close()
        if self.grounder is not None:
            self.grounder.close()
        for p in {id(p): p for p in self.projectors.values()}.values():
            p.close()
        if getattr(self, "_imaginer", None) is not None:
            self._imaginer.close()
        self.llm.close()
        if getattr(self, "_pinned", None) is not None:   # after llama.cpp let go of it
            self._pinned.close()
            self._pinned = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
