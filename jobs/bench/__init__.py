"""The benchmarks behind jobs/benchmark.py, one module per kind, each registering its commands (add_commands):

    common.py           what they share: device and timing, the timed training step, in-process training,
                        curves over seeds and their cache, MLflow logging, the options several commands take
    speed.py            train, overhead, loader, sampling
    convergence.py      convergence (--against baseline, ode, experts)
    quality.py          objectives, paint
    time_to_quality.py  time-to-quality
    system.py           serve, overload, checkpoints, gpu
    parts.py            the gpu plan's timed parts, each in a fresh process
"""
