"""The standard diffusers denoising loop, shared by the tests that compare against diffusers."""


def run_diffusers(sched, model, nfe, x, generator=None, begin_index=None, **set_kw):
    """`set_timesteps`, then `scale_model_input -> model -> step` over `sched.timesteps` (from
    `begin_index`), as diffusers' pipelines run a scheduler."""
    sched.set_timesteps(nfe, **set_kw)
    if begin_index is not None:
        sched.set_begin_index(begin_index)
    x = x * getattr(sched, "init_noise_sigma", 1.0)  # FlowMatch* schedulers have none
    for t in sched.timesteps[begin_index or 0:]:
        kw = {} if generator is None else {"generator": generator}
        x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        x = sched.step(model(x_in, t).sample, t, x, **kw).prev_sample
    return x
