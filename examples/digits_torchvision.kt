# digits_torchvision.kt: torchvision's ResNet-18 as the frozen teacher on 8x8 digits, on a CPU.
# dclang pre-trains it on labels (cached) with the stem it gives torchvision ResNets on images
# of 32x32 or less: a 3x3 stride-1 convolution reading one channel and no max-pool, so a digit
# keeps its 8x8 resolution into the first block (ImageNet's stem would leave 2x2). The
# quickstart's student and a small peer learn from it and from each other.
graph digits_torchvision

data digits {
  augment = pad_crop
  pad = 1
  val_split = 300
}

train {
  epochs = 10
  batch = 64
  optimizer = sgd(lr=0.05, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = cosine
  seed = 0
}

node student : cnn_small            [target]
node peer    : cnn_tiny
node teacher : torchvision.resnet18 [frozen]

label   -> student : through
label   -> peer    : through
teacher -> student : linear
peer    -> student : correct
student -> peer    : correct kl(T=2)
