# digits_torchvision.kt: torchvision models on 8x8 digits, on a CPU in a few minutes.
# torchvision's ResNet-18 is the frozen teacher (pre-trained on labels by dclang, cached); for
# images of 32x32 or less dclang gives a torchvision ResNet a 3x3 stride-1 stem without
# max-pool, and a stem reading one channel, so an 8x8 digit keeps its resolution into the
# first block. A ShuffleNetV2 peer and the quickstart's student learn from each other.
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

node student : cnn_small                      [target]
node peer    : torchvision.shufflenet_v2_x0_5
node teacher : torchvision.resnet18           [frozen]

label   -> student : through
label   -> peer    : through
teacher -> student : linear
peer    -> student : correct
student -> peer    : correct kl(T=2)
