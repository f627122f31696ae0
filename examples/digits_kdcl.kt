# digits_kdcl.kt: kdcl.kt on 8x8 digits, minutes on a CPU: Knowledge Distillation via
# Collaborative Learning (Guo et al. 2020, CVPR), naive variant. A ResNet20 and a
# WideResNet-16-2, each on its own augmentation of every image, are both taught by the mean
# of their logits at T = 2; the ResNet20 is the target.
graph digits_kdcl

data digits {
  augment = pad_crop
  pad = 1
  val_split = 800
}

train {
  epochs = 15
  batch = 64
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = cosine
  seed = 0
}

node a   : resnet20       [target, view=own]
node b   : wrn16_2        [view=own]
node ens : ensemble(a, b)

label -> a : through
label -> b : through
ens   -> a : through kl(T=2)
ens   -> b : through kl(T=2)
