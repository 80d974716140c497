"""psunet: Partially Shared U-Net diffusion over text + image, with joint-infilling sampling.

PyTorch with diffusers (noise schedules, samplers, the autoencoder), gensim (word vectors) and webdataset
(shards); no Ray and no MLflow: orchestration lives in jobs/ and dataprep/. `import psunet` imports torch,
pydantic, torchdiffeq and diffusers (psunet.settings imports psunet.diffusion, whose schedulers are diffusers');
PSUNetPipeline and PSUNetPipelineOutput are imported when first asked for, and with them gensim and webdataset.

    from psunet import PSUNetPipeline
    pipe = PSUNetPipeline.from_pretrained("runs/demo/model")
    image = pipe(prompt="a small red circle on the left").images[0]
"""

from psunet.config import DiffusionConfig, ModelConfig, baseline_of, preset
from psunet.model import PSUNet, forward_flops, parameter_counts
from psunet.settings import SamplerSettings

__all__ = ["DiffusionConfig", "ModelConfig", "PSUNet", "PSUNetPipeline", "PSUNetPipelineOutput", "SamplerSettings",
           "baseline_of", "forward_flops", "parameter_counts", "preset"]


def __getattr__(name: str):
    # the pipeline pulls in gensim and webdataset: imported when asked for, not with every psunet module
    if name in ("PSUNetPipeline", "PSUNetPipelineOutput"):
        from psunet import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'psunet' has no attribute {name!r}")
