# digits_rkd.kt: rkd.kt on 8x8 digits, minutes on a CPU: relational knowledge distillation
# (Park et al. 2019, Relational Knowledge Distillation, CVPR). A WideResNet-16-2 teacher
# (pre-trained on labels, frozen) teaches a ResNet20 student the distances and angles
# between the batch's pooled features, with the paper's potentials (25 and 50: `weight=25`
# on the default `distance=1, angle=2`), besides the labels.
graph digits_rkd

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

node student : resnet20 [target]
node teacher : wrn16_2  [frozen]  # pre-trained on labels by dclang (cached), never updated

label        -> student      : through
teacher.pool -> student.pool : through rkd(distance=1, angle=2, weight=25)
