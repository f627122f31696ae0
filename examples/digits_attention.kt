# digits_attention.kt: attention.kt on 8x8 digits, minutes on a CPU. A WideResNet-16-2
# teacher (pre-trained on labels, frozen) teaches a ResNet20 student its attention at the
# three stages (8x8, 4x4, 2x2 on digits) and its outputs by KL at T = 4. `at` averages over
# positions, so maps with 16x fewer positions than CIFAR's give 16x larger losses: the
# paper's weight 500 becomes 30 here (500 swamped the labels: 30% test accuracy).
graph digits_attention

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

label          -> student        : through
teacher        -> student        : through kl(T=4)
teacher.layer1 -> student.layer1 : through at(p=2, weight=30)
teacher.layer2 -> student.layer2 : through at(p=2, weight=30)
teacher.layer3 -> student.layer3 : through at(p=2, weight=30)
