"""From TiM weights to pictures: :class:`TiMPipeline` (Python) and ``python -m tim_jax.sample``
(the CLI, :mod:`tim_jax.inference.cli`).

    from tim_jax.inference import TiMPipeline
    pipe = TiMPipeline.from_pretrained("c2i_model_256.safetensors", "sd-vae-ft-ema")
    out = pipe(labels=[207, 360], num_steps=4, cfg_scale=2.5, cfg_interval=(0.0, 0.6))
    out.pil()[0].save("golden_retriever.png")

Modules: ``pipeline`` (the pipeline and its output), ``loading`` (official file / converted
directory / EMA export -> network), ``request`` (validation of one request), ``images`` (sizes,
uint8 pixels, grids), ``cli`` (the command line).
"""
from tim_jax.inference.loading import LoadedNetwork, infer_preset, load_network
from tim_jax.inference.pipeline import PipelineOutput, TiMPipeline
from tim_jax.inference.request import SampleRequest, random_labels

__all__ = ["TiMPipeline", "PipelineOutput", "SampleRequest", "LoadedNetwork", "load_network",
           "infer_preset", "random_labels"]
