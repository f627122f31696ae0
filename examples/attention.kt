# attention.kt: attention transfer (Zagoruyko & Komodakis 2017) plus KD, as a knowledge
# transfer graph. A WideResNet-28-2 teacher, pre-trained on labels and frozen, teaches a
# ResNet32 student its spatial attention at the end of each of the three stages (same
# resolutions: 32x32, 16x16, 8x8; the channel counts differ, which attention maps ignore)
# and its outputs by KL at T = 4, as in the paper's AT + KD setting. weight=500 is the
# paper's beta/2 = 1000/2 per layer.
graph attention

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

node student : resnet32 [target]
node teacher : wrn28_2  [frozen]  # pre-trained on labels (cached), never updated

label          -> student        : through
teacher        -> student        : through kl(T=4)
teacher.layer1 -> student.layer1 : through at(p=2, weight=500)
teacher.layer2 -> student.layer2 : through at(p=2, weight=500)
teacher.layer3 -> student.layer3 : through at(p=2, weight=500)
