"""Constrained decode steps with the host's grammar work hidden under the GPU's next forward.

The serial constrained step (SlotDecoder's `_constrained_step_serial`) runs: forward -> the host fills the
masks -> copy, mask, choose -> the host reads the tokens -> the matchers consume them -> next forward; the
GPU idles through the copy-in, the reads and the consumption, and through the fill whenever the fill is
longer than the forward. Here, one step k is:

    mask(k) host -> device (pinned, asynchronous) ; mask + choose(k) ; tokens(k) device -> pinned host ;
    event ; forward(k+1) issued ; host waits for the event (not for forward(k+1)) ;
    matchers consume tokens(k) (parallel threads) ; the host fills mask(k+1) (parallel threads)

so the consumption and the next fill run while forward(k+1) runs on the GPU; the one wait per step is
for choose(k), queued behind forward(k) (which the host's fill overlapped). Forward(k+1) needs only
token k, which choose(k) leaves in the decoder's `tokens` on the device.

Exactness: each slot's logits depend only on its own tokens and cache, the masks are the same masks and
the choice is the decoder's own `_choose`, so every slot's tokens equal the serial step's. One case needs
care: a slot refilled by a prefill while forward(k+1) is already in flight has stale logits in it. Such
a slot is *held* for that step (`hold`): it is excluded from the choice (does not advance, its matcher
consumes nothing) and takes its first decode step from forward(k+2), which sees its prefilled state.

Contract with SlotDecoder: `_logits()` returns the next-token logits [slots, >= vocab] of every slot
from the decoder's state and only writes the KV cache at each slot's current position; `_choose(logits)`
picks for the slots where `active` is set and advances them, reading `active` from the decoder's tensor
(so clearing a held slot's flag around it keeps that slot still). The host bitmask's rows of slots
without a matcher are all-allowed (actors/grammar.HostBitmask).
"""
from __future__ import annotations

import time

import torch

from actors.grammar import GrammarMasks, HostBitmask, apply_bitmask, bit_shifts


class PipelinedConstrainedSteps:
    """One static decoder's pipelined constrained steps: buffers, CUDA graphs and the forward in flight."""

    def __init__(self, decoder, masks: GrammarMasks):
        d = self.decoder = decoder
        self.masks = masks
        self.cuda = d.device.type == "cuda"
        dev = d.device
        self.host_mask = HostBitmask(masks, d.slots, pin=self.cuda)
        self.device_mask = torch.full((d.slots, masks.words), -1, dtype=torch.int32, device=dev)
        self.shifts = bit_shifts(dev)
        self.held = torch.zeros(d.slots, dtype=torch.bool, device=dev)  # refilled under a forward in flight
        # after a choice: each slot's token at its (new) position, whether it advanced, whether still active
        self.out = torch.zeros(3, d.slots, dtype=torch.long, device=dev)
        self.host_out = torch.zeros(3, d.slots, dtype=torch.long, pin_memory=self.cuda)
        self.logits: torch.Tensor | None = None  # the forward's output (a static buffer under graphs)
        self.forward_graph = None
        self.choose_graph = None
        self.pending = False  # a forward for the next step is issued and its mask is filled on the host
        self.steps = 0
        # CUDA events: per step, the forward's start/end (two sets: the next forward's are recorded before
        # this step's are read), the choice's start/end (the end is the one the host waits on)
        self._forward_events = [self._events(2), self._events(2)] if self.cuda else None
        self._choose_events = self._events(2) if self.cuda else None
        self._parity = 0
        self._interrupted = False
        self.host_active: list[int] | None = None  # each slot's active flag after the last choice, as read
        self._held_rows: set[int] = set()
        if self.cuda and d.use_cuda_graph:
            started = time.perf_counter()
            self._capture()
            masks.stats["capture_s"] += time.perf_counter() - started

    @staticmethod
    def _events(n: int) -> list:
        return [torch.cuda.Event(enable_timing=True) for _ in range(n)]

    # -- the device work (eager, or replayed from CUDA graphs) ------------------------------------
    def _choose_eager(self) -> None:
        """Mask, then the decoder's own choice for the slots not held; `out` gets what the host reads."""
        d = self.decoder
        apply_bitmask(self.logits, self.device_mask, self.masks.vocab, self.shifts)
        keep = d.active & self.held
        self.out[1].copy_(d.active & ~self.held)
        d.active &= ~self.held
        d._choose(self.logits)
        d.active |= keep
        self.held.zero_()
        self.out[0].copy_(d.tokens[d.rows, d.pos])
        self.out[2].copy_(d.active)

    def _capture(self) -> None:
        """Capture the forward and the mask+choice as two CUDA graphs (warmed up on a side stream first),
        then replay both once; the decoder's state is restored after each part, also when one raises."""
        d = self.decoder
        saved = [t.clone() for t in (d.pos, d.active, d.tokens)]

        def restore():
            for t, s in zip((d.pos, d.active, d.tokens), saved):
                t.copy_(s)
            self.held.zero_()

        self.logits = torch.zeros(d.slots, d.model.lm_head.out_features, device=d.device, dtype=torch.float32)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # the forward writes the cache at each slot's position only: harmless
                    self.logits.copy_(d._logits())
                    self._choose_eager()
                    restore()
            torch.cuda.current_stream().wait_stream(stream)
            forward_graph, choose_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(forward_graph):
                self.logits.copy_(d._logits())
            with torch.cuda.graph(choose_graph):
                self._choose_eager()
            forward_graph.replay()
            choose_graph.replay()
            torch.cuda.synchronize(d.device)
        finally:
            restore()
        self.forward_graph, self.choose_graph = forward_graph, choose_graph

    def _forward(self) -> None:
        if self.cuda:
            start, end = self._forward_events[self._parity]
            start.record()
        if self.forward_graph is not None:
            self.forward_graph.replay()
        else:
            self.logits = self.decoder._logits()
        if self.cuda:
            end.record()

    # -- one step ---------------------------------------------------------------------------------
    def hold(self, slots: list[int]) -> None:
        """Slots a prefill just wrote: while a forward is in flight its logits for them are stale, so they
        sit out the next choice (their first decode step comes from the forward after it)."""
        if not self.pending:
            return
        self._interrupted = True  # the GPU ran the prefill between this forward and its choice
        for slot in slots:
            self.held[slot] = True  # a scalar fill of a view: no host-to-device copy
        self._held_rows.update(slots)
        # (a slot active at the last read is active still: only a choice ends one)
        if all(not active or i in self._held_rows for i, active in enumerate(self.host_active)):
            # the forward in flight serves no slot that will be chosen for (a new call's first prefill, or
            # every active slot refilled): forget it, and the next step starts with a fresh one
            self.pending = self._interrupted = False
            self.held.zero_()
            self._held_rows.clear()

    def step(self) -> None:
        d, masks, stats = self.decoder, self.masks, self.masks.stats
        started = time.perf_counter()
        if not self.pending:  # no forward in flight (first step, or after unconstrained steps)
            self._forward()
            self.host_mask.fill([(m, i) for i, m in enumerate(d.matchers) if m is not None])
        parity = self._parity
        if self.cuda:
            self._choose_events[0].record()
        self.host_mask.copy_to(self.device_mask, d.slots)
        if self.choose_graph is not None:
            self.choose_graph.replay()
        else:
            self._choose_eager()
        stats["held_slots"] += len(self._held_rows)
        self._held_rows.clear()
        self.host_out.copy_(self.out, non_blocking=True)
        if self.cuda:
            self._choose_events[1].record()
        # the next forward needs only the tokens just chosen; none is issued once no slot has a grammar
        # (the decoder then goes back to its unconstrained step)
        ahead = any(m is not None for m in d.matchers)
        if ahead:
            self._parity ^= 1
            self._forward()
        self.pending = ahead
        issued = time.perf_counter()
        if self.cuda:
            self._choose_events[1].synchronize()
        tokens, advanced, active = self.host_out.tolist()
        self.host_active = active
        stats["host_reads"] += 1
        waited = time.perf_counter()
        if self.cuda:
            self._time_gpu(parity)
        masks.consume([(m, tokens[i]) for i, m in enumerate(d.matchers)
                       if m is not None and advanced[i] and not m.is_stopped()])
        consumed = time.perf_counter()
        if ahead:  # the next step's masks: slots still active with a matcher (stopped ones allow eos)
            self.host_mask.fill([(m, i) for i, m in enumerate(d.matchers) if m is not None and active[i]])
        filled = time.perf_counter()
        self.steps += 1
        stats["steps"] += 1
        stats["launch_s"] += issued - started
        stats["wait_s"] += waited - issued
        stats["consume_s"] += consumed - waited
        stats["fill_s"] += filled - consumed

    def _time_gpu(self, parity: int) -> None:
        """GPU time of the step just waited for (all its events are complete)."""
        stats = self.masks.stats
        forward_start, forward_end = self._forward_events[parity]
        choose_start, choose_end = self._choose_events
        stats["gpu_forward_s"] += forward_start.elapsed_time(forward_end) / 1000
        stats["gpu_choose_s"] += choose_start.elapsed_time(choose_end) / 1000
        stats["gpu_timed_steps"] += 1
        if self._interrupted:  # the gap held a prefill's GPU work: not idle time
            self._interrupted = False
        else:
            stats["gpu_idle_s"] += forward_end.elapsed_time(choose_start) / 1000
            stats["gpu_idle_steps"] += 1
