"""pe_llm's engine telemetry as Triton custom metrics, served on Triton's own /metrics."""
from __future__ import annotations

from typing import Any

STEP_BATCH_BUCKETS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
WINDOW_STATUSES = ("done", "cancelled", "failed")


class TritonEngineMetrics:
    """An EngineObserver over ``pb_utils.MetricFamily``; every series is labelled with the model name."""

    def __init__(self, pb_utils: Any, model: str) -> None:
        family = pb_utils.MetricFamily
        labels = {"model": model}
        self._families = [  # a Metric must not outlive its family: keep both
            family(name="pe_llm_live_windows", description="Windows being decoded", kind=family.GAUGE),
            family(name="pe_llm_step_batch_size", description="Windows advanced by one batched decode step",
                   kind=family.HISTOGRAM),
            family(name="pe_llm_decode_steps_total", description="Window decode steps run", kind=family.COUNTER),
            family(name="pe_llm_prompt_tokens_total", description="Prompt tokens of decided windows",
                   kind=family.COUNTER),
            family(name="pe_llm_prompt_tokens_cached_total",
                   description="Prompt tokens taken from the prompt-head cache, not prefilled", kind=family.COUNTER),
            family(name="pe_llm_windows_total", description="Windows answered, by status", kind=family.COUNTER),
            family(name="pe_llm_warm_up_seconds", description="Seconds the load-time warm-up took",
                   kind=family.GAUGE),
            family(name="pe_llm_prefill_tokens_total", description="Prompt tokens prefilled (chunks within the budget)",
                   kind=family.COUNTER),
            family(name="pe_llm_tie_restarts_total",
                   description="Windows decoded again alone after a near-tie in a batched step", kind=family.COUNTER),
        ]
        live, batch, steps, prompt, cached, windows, warm, prefill, restarts = self._families
        self.live = live.Metric(labels=labels)
        self.batch = batch.Metric(labels=labels, buckets=STEP_BATCH_BUCKETS)
        self.steps = steps.Metric(labels=labels)
        self.prompt = prompt.Metric(labels=labels)
        self.cached = cached.Metric(labels=labels)
        self.windows = {s: windows.Metric(labels={**labels, "status": s}) for s in WINDOW_STATUSES}
        self.warm = warm.Metric(labels=labels)
        self.prefill = prefill.Metric(labels=labels)
        self.restarts = restarts.Metric(labels=labels)

    def on_step(self, batch: int) -> None:
        self.batch.observe(float(batch))
        self.steps.increment(float(batch))

    def on_window(self, outcome, status: str) -> None:
        self.windows[status].increment(1.0)
        if outcome is not None:
            self.prompt.increment(float(outcome.prompt_tokens))
            self.cached.increment(float(outcome.cached_tokens))

    def on_live(self, live: int) -> None:
        self.live.set(float(live))

    def on_prefill(self, tokens: int) -> None:
        self.prefill.increment(float(tokens))

    def on_restart(self) -> None:
        self.restarts.increment(1.0)

    def on_warm_up(self, seconds: float) -> None:
        self.warm.set(float(seconds))
