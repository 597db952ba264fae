"""Gateway metrics with an injected clock: exact counts and values."""

from prometheus_client.parser import text_string_to_metric_families

from server.metrics import GatewayMetrics


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def samples(metrics) -> dict:
    body, _ = metrics.render()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_request_timings_are_exact():
    clock = Clock()
    m = GatewayMetrics(clock)
    for tokens in (1, 3, 5):
        r = m.request(prompt_tokens=10)
        clock.now += 0.5            # TTFT 0.5 s
        for _ in range(tokens):
            r.token()
            clock.now += 0.1        # 0.1 s between tokens
        clock.now -= 0.1
        r.finish("length")
        r.finish("error")           # ignored
    s = samples(m)
    assert s[("pdserve_time_to_first_token_seconds_count", ())] == 3
    assert abs(s[("pdserve_time_to_first_token_seconds_sum", ())] - 1.5) < 1e-9
    assert s[("pdserve_inter_token_latency_seconds_count", ())] == 0 + 2 + 4
    assert s[("pdserve_generation_tokens_total", ())] == 9
    assert s[("pdserve_prompt_tokens_total", ())] == 30
    assert s[("pdserve_time_per_output_token_seconds_count", ())] == 2
    assert abs(s[("pdserve_time_per_output_token_seconds_sum", ())] - 0.2) < 1e-9
    assert s[("pdserve_requests_total", (("finish_reason", "length"),))] == 3
    assert s[("pdserve_requests_total", (("finish_reason", "error"),))] == 0
    first_bucket = min(float(dict(k[1])["le"]) for k in s
                       if k[0] == "pdserve_time_to_first_token_seconds_bucket")
    assert first_bucket == 0.001


def test_worker_gauges_and_forgetting_a_worker():
    m = GatewayMetrics()
    m.worker_health("10.0.0.1:50052", "decode", True, free_blocks=75, total_blocks=100,
                    running=3, waiting=1, queued_prompt_tokens=0)
    labels = (("role", "decode"), ("worker", "10.0.0.1:50052"))
    s = samples(m)
    assert s[("pdserve_kv_cache_usage_ratio", labels)] == 0.25
    assert s[("pdserve_batch_size", labels)] == 3 and s[("pdserve_worker_up", labels)] == 1
    m.forget_worker("10.0.0.1:50052", "decode")
    assert not any(k[1] == labels for k in samples(m))


def test_restarts_and_migrations_count_up_once_each():
    m = GatewayMetrics()
    labels = (("role", "decode"), ("worker", "10.0.0.1:50052"))
    m.worker_health("10.0.0.1:50052", "decode", True, free_blocks=1, total_blocks=1,
                    running=0, waiting=0, queued_prompt_tokens=0)
    assert samples(m)[("pdserve_worker_restarts_total", labels)] == 0
    for _ in range(3):  # a restart seen by the pool
        m.worker_restarted("10.0.0.1:50052", "decode")
    m.migrated()
    m.migrated()
    s = samples(m)
    assert s[("pdserve_worker_restarts_total", labels)] == 3
    assert s[("pdserve_migrations_total", ())] == 2
    m.forget_worker("10.0.0.1:50052", "decode")
    assert not any(k[1] == labels for k in samples(m))


def test_prefill_report_and_rejections():
    m = GatewayMetrics()
    m.request(5).prefill(compute_seconds=0.2, transfer_seconds=0.05, kv_bytes=1000)
    m.rejected(429)
    s = samples(m)
    assert s[("pdserve_kv_transfer_bytes_total", ())] == 1000
    assert s[("pdserve_prefill_time_seconds_count", ())] == 1
    assert s[("pdserve_request_errors_total", (("status", "429"),))] == 1


def test_request_without_tokens_counts_in_e2e_only():
    clock = Clock()
    m = GatewayMetrics(clock)
    r = m.request(prompt_tokens=4)
    r.queued(0.25)
    clock.now += 2.0
    r.finish("error")
    s = samples(m)
    assert s[("pdserve_e2e_request_latency_seconds_count", ())] == 1
    assert abs(s[("pdserve_e2e_request_latency_seconds_sum", ())] - 2.0) < 1e-9
    assert s[("pdserve_time_to_first_token_seconds_count", ())] == 0
    assert s[("pdserve_time_per_output_token_seconds_count", ())] == 0
    assert s[("pdserve_request_queue_time_seconds_sum", (("priority", "0"),))] == 0.25
    assert s[("pdserve_request_generation_tokens_count", ())] == 1
    assert s[("pdserve_request_generation_tokens_sum", ())] == 0
    assert s[("pdserve_requests_total", (("finish_reason", "error"),))] == 1


def test_running_and_waiting_gauges():
    m = GatewayMetrics()
    m.set_running(4)
    m.set_waiting(2)
    s = samples(m)
    assert s[("pdserve_requests_running", ())] == 4
    assert s[("pdserve_requests_waiting", ())] == 2
    assert m.render()[1].startswith("text/plain")


def test_queue_time_is_kept_by_priority_with_bounded_labels():
    m = GatewayMetrics()
    for priority, seconds in [(0, 1.0), (5, 2.0), (5, 3.0), (-3, 0.5), (99, 7.0), (-50, 9.0)]:
        m.request(10, priority).queued(seconds)
    s = samples(m)
    sums = {labels[0][1]: value for (name, labels), value in s.items()
            if name == "pdserve_request_queue_time_seconds_sum"}
    assert sums == {"0": 1.0, "5": 5.0, "-3": 0.5, ">20": 7.0, "<-20": 9.0}
