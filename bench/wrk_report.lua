-- wrk calls done() once at the end of a run; this prints the figures bench/threads_list.py needs as one JSON line,
-- so it reads exact numbers (microseconds, counts) rather than parsing wrk's rounded text report.
-- wrk counts responses with status >= 400 in errors.status; socket errors and timeouts have their own counters.
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"p50_us":%.0f,"p99_us":%.0f,"mean_us":%.1f,' ..
    '"max_us":%.0f,"errors_connect":%.0f,"errors_read":%.0f,"errors_write":%.0f,"errors_status":%.0f,' ..
    '"errors_timeout":%.0f}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(99),
    latency.mean, latency.max, errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end
