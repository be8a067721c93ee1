"""Cats vs dogs by transfer learning: ImageNet ResNet-50, head first, then fine-tuning.

    # timm's copy of torchvision's ResNet-50 (IMAGENET1K_V2) is downloaded from the
    # Hugging Face hub into its cache (HF_HOME) on first use and converted on the fly;
    # no torch needed. 3 epochs with the backbone frozen (head only), then 7 epochs of
    # fine-tuning the whole network with the backbone at 0.1 x the learning rate.
    python run_train.py --config configs/catdog_finetune.py --workdir /tmp/catdog_ft \
        --config.data.source=folder:/path/to/PetImages

    # Offline: a copy of the hub's cache (HF_HUB_OFFLINE=1 then never asks the hub),
    # torchvision's own file (--config.init_from=torchvision:resnet50 reads it from
    # TORCH_HOME/hub/checkpoints), or a workdir imported from a local file:
    #   jaxcls-pretrained import --arch resnet50 --weights resnet50-11ad3fa6.pth \
    #       --out /tmp/resnet50_imagenet      # then --config.init_from=/tmp/resnet50_imagenet

Batch norm stays in inference mode inside the pretrained backbone throughout (its
ImageNet statistics are kept), and the input normalization is the one published with the
weights (timm's config.json: ImageNet's mean and std). Images are 224 px, the size the
weights are evaluated at.

Accuracy: NOT measured here (this machine has neither the data nor the weights, nor the
compute for ResNet-50 at 224 px). Published figures for comparable recipes:
- Keras's transfer-learning guide (cats_vs_dogs, frozen Xception base + new head):
  about 97% validation accuracy; about 98% after fine-tuning the whole model
  (published, not measured here).
- fastai's quick start (Oxford-IIIT Pet, cat vs dog, ResNet-34 fine-tuned one epoch):
  about 99.5% accuracy (0.5% error) (published, not measured here).
"""

from jaxcls.config import base_config


def get_config():
  config = base_config()
  config.data.source = "folder:PetImages"
  config.init_from = "hf-hub:timm/resnet50.tv2_in1k"
  config.data.image_size = 224
  config.model.name = "resnet50"
  config.model.dropout = 0.2
  config.optim.learning_rate = 0.01
  config.optim.nesterov = True
  config.optim.weight_decay = 1e-4
  config.optim.warmup_epochs = 0.5
  config.optim.freeze = "backbone"
  config.optim.backbone_lr_mult = 0.1
  config.train.unfreeze_after_epochs = 3
  config.train.label_smoothing = 0.1
  return config
