"""The architectures `pipeline` fine-tunes, torch-free so `pipeline --help` and the options
dataclasses can name them without importing torchvision."""

ARCHS = ("alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
         "vgg19_bn")
