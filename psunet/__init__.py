"""psunet: Partially Shared U-Net diffusion over text + image, with joint-infilling sampling.

Pure PyTorch + diffusers/gensim/webdataset; orchestration (Ray, MLflow) lives in jobs/ and dataprep/.
"""

from psunet.config import DiffusionConfig, ModelConfig, baseline_of, preset
from psunet.model import PSUNet, forward_flops, parameter_counts
from psunet.settings import SamplerSettings

__all__ = ["DiffusionConfig", "ModelConfig", "PSUNet", "SamplerSettings", "baseline_of", "forward_flops",
           "parameter_counts", "preset"]
