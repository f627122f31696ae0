# digits_mean_teacher.kt: mean_teacher.kt on 8x8 digits, minutes on a CPU: mean-teacher
# distillation (Tarvainen and Valpola 2017, NeurIPS). The teacher is the moving average of a
# ResNet20 student's weights (decay 0.9: digits trains for 150 updates, not 100,000), on its
# own augmentation of each image, teaching the student; the averaged model is the target.
graph digits_mean_teacher

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

node s : resnet20
node t : ema(s, decay=0.9) [target, view=own]

label -> s : through
t     -> s : through kl(T=1)
