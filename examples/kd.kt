# kd.kt: knowledge distillation (Hinton et al.) as a knowledge transfer graph.
# Mirrors the "KD (T = 2)" row of Table 2 (71.43 ± 0.43 on CIFAR-100): a ResNet110 teacher,
# pre-trained on labels only and then frozen, teaches a ResNet32 student, which also
# learns from the labels. Paper Fig. 1a draws the same graph.
graph kd

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

node student : resnet32  [target]
node teacher : resnet110 [frozen]  # pre-trained on labels (cached), never updated

label   -> student : through
teacher -> student : through kl(T=2)  # KL at temperature 2, scaled by T^2
