"""BuboGPT's grounding beside the chat: tags -> boxes -> masks per picture, phrases per answer.

A picture is grounded once, in a worker thread, as soon as it is sent (app.py runs tagging at
upload and prompt2mask2 right after): RAM tags, GroundingDINO boxes for the tags' caption,
one SAM mask per box. The result is cached by the picture's content hash. When an answer
is complete, its phrases are linked to the detector's labels (matcher.py) and become
`Entity` records (grounding.py): the phrase, its span in the answer, the label's boxes and
masks, the label's palette colour. The worker runs at a lower CPU priority (Linux), so
grounding never delays the streamed answer more than its share of the cores.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .bundle import Bundle
from .detector import Detection, Detector
from .errors import BundleError
from .grounding import Entity, Region, color_of, rle_encode
from .matcher import LlmMatcher, match
from .segmenter import Segmenter
from .tagger import Tagger, load_tag_table

log = logging.getLogger("scops")

# Detections above the box threshold kept per picture, best scores first. A random or
# cluttered picture can pass hundreds of GroundingDINO's 900 queries; each kept one costs
# a SAM decode and a full-size mask. The rest are counted in `dropped`.
MAX_DETECTIONS = 50
PICTURES_CACHED = 16
WORKER_NICE = 10           # os.setpriority increment of the grounding thread (Linux)


@dataclass
class PictureGrounding:
    """What the stages found in one picture (independent of any answer)."""
    size: tuple[int, int]                                # H, W of the original picture
    tags: list[str]
    detections: list[Detection]
    masks: list[dict]                                    # RLE, one per detection
    dropped: int = 0                                     # detections over MAX_DETECTIONS
    timings: dict = field(default_factory=dict)

    def labels(self) -> list[str]:
        """Distinct detector labels, first-seen order (prompt2mask2's entity_dict keys)."""
        return list(dict.fromkeys(d.phrase for d in self.detections if d.phrase))


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
    except (AttributeError, OSError):        # not Linux, or not allowed: run at normal priority
        pass


class Grounder:
    def __init__(self, bundle: Bundle, providers: list, threads: int, llm=None):
        self.bundle = bundle
        self.record = bundle.manifest["grounding"]
        self.providers, self.threads, self.llm = providers, threads, llm
        self._stages = None
        self._cache: OrderedDict[str, tuple[Future, list]] = OrderedDict()      # key -> (job, its picture while queued)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="scops-ground", initializer=_lower_priority)
        matcher = self.record.get("matcher")
        self.matcher = LlmMatcher(llm, bundle.template, int(matcher["max_tokens"])) \
            if matcher is not None and llm is not None else None

    # ---- stages (loaded in the worker, on first use) ----------------------------------------
    def _load(self):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from .encode import _session_options

        def session(name):
            try:
                return ort.InferenceSession(str(self.bundle.file(name)), _session_options(self.threads),
                                            providers=self.providers)
            except Exception as e:
                raise BundleError(f"{name}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None

        tag_rec, det_rec, seg_rec = self.record["stages"]
        tags, thresholds = load_tag_table(self.bundle.file(tag_rec["tags"]))
        tokenizer = Tokenizer.from_file(str(self.bundle.file(det_rec["tokenizer"])))
        return (Tagger(session(tag_rec["file"]), tag_rec, tags, thresholds),
                Detector(session(det_rec["file"]), det_rec, tokenizer),
                Segmenter(session(seg_rec["encoder"]), session(seg_rec["decoder"]), seg_rec))

    def stages(self):
        if self._stages is None:
            self._stages = self._load()
        return self._stages

    # ---- per picture ----------------------------------------------------------------------
    def ground(self, rgb: np.ndarray) -> PictureGrounding:
        """Run the three stages on one picture (synchronously)."""
        tagger, detector, segmenter = self.stages()
        t0 = time.perf_counter()
        tags = tagger(rgb)
        t1 = time.perf_counter()
        found = detector(rgb, tags) if tags else []
        t2 = time.perf_counter()
        found.sort(key=lambda d: -d.score)
        dropped = max(0, len(found) - MAX_DETECTIONS)
        found = found[:MAX_DETECTIONS]
        masks = []
        if found:
            boxes = np.asarray([d.box for d in found], np.float32)
            each, _ = segmenter.masks(rgb, boxes)
            masks = [rle_encode(m) for m in each]
        t3 = time.perf_counter()
        if dropped:
            log.info("grounding: %d detections over the cap of %d were dropped", dropped, MAX_DETECTIONS)
        return PictureGrounding(rgb.shape[:2], tags, found, masks, dropped,
                                {"tag_ms": (t1 - t0) * 1e3, "detect_ms": (t2 - t1) * 1e3,
                                 "segment_ms": (t3 - t2) * 1e3})

    def submit(self, key: str, rgb: np.ndarray) -> Future:
        """Ground a picture in the worker (once per content hash); returns its future. At most
        PICTURES_CACHED pictures are kept: an older one still waiting for the worker is
        cancelled and its pixels (up to 150 MB at 50 MP) let go at once."""
        with self._lock:
            fut = self._cache.get(key, (None,))[0]
            if fut is None or fut.cancelled() or (fut.done() and fut.exception() is not None):
                held = [rgb]                  # emptied if the job is cancelled before it runs
                fut = self._pool.submit(self._ground_queued, held)
                self._cache[key] = (fut, held)
            self._cache.move_to_end(key)
            while len(self._cache) > PICTURES_CACHED:
                _, (old, held) = self._cache.popitem(last=False)
                if old.cancel():
                    held.clear()
            return fut

    def _ground_queued(self, held: list) -> PictureGrounding:
        return self.ground(held.pop())

    def future(self, key: str) -> Future | None:
        with self._lock:
            return self._cache.get(key, (None,))[0]

    # ---- per answer -----------------------------------------------------------------------
    def entities(self, picture: PictureGrounding, answer: str, media: int = 0) -> tuple[list[Entity], dict]:
        """Link the answer's phrases to this picture's detections -> (entities, facts)."""
        labels = picture.labels()
        t0 = time.perf_counter()
        found, how = match(labels, answer, self.matcher)
        colors = {lab: color_of(i) for i, lab in enumerate(labels)}
        out = []
        for n, m in enumerate(found, 1):
            regions = tuple(Region(media=media, box=d.box, mask=mask, score=d.score)
                            for d, mask in zip(picture.detections, picture.masks) if d.phrase == m.label)
            out.append(Entity(answer[m.span[0]:m.span[1]], m.span, regions, tag=m.label, color=colors[m.label],
                              extra={"number": n}))
        facts = {"tags": picture.tags, "labels": labels, "matcher": how, "dropped": picture.dropped,
                 "timings": dict(picture.timings, match_ms=(time.perf_counter() - t0) * 1e3)}
        return out, facts

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.matcher is not None:
            self.matcher.close()
