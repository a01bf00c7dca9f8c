"""`abl bench`: the serving benchmark (HTTP load, in-process baselines, cancellation)."""
