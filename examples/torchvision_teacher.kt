# torchvision_teacher.kt: torchvision's ImageNet ResNet-18 as a frozen teacher on CIFAR-100,
# teaching a CIFAR ResNet32 and torchvision's MobileNetV3-Small, which also learn from each other.
# The teacher's head (1000 classes) and stem (7x7 stride 2 and a max-pool, too coarse for 32x32
# images) are replaced, so dclang first fine-tunes it on CIFAR-100's labels from the ImageNet
# weights (cached like any pre-trained teacher). The weights file must be in torch hub's cache:
# dclang never downloads; `dclang run` says which file and where to put it.
graph torchvision_teacher

data cifar100 {
  augment = pad_crop_flip
  val_split = 5000
}

train {
  epochs = 200
  batch = 64
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = step(milestones=[60, 120, 180], gamma=0.1)
  seed = 0
}

node student : resnet32                                      [target]
node peer    : torchvision.mobilenet_v3_small
node teacher : torchvision.resnet18(weights="IMAGENET1K_V1") [frozen]

label   -> student : through
label   -> peer    : through
teacher -> student : linear
teacher -> peer    : linear
peer    -> student : correct
student -> peer    : correct kl(T=2)
