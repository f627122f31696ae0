# mean_teacher.kt: mean-teacher distillation (Tarvainen and Valpola 2017, Mean teachers are
# better role models: Weight-averaged consistency targets improve semi-supervised deep
# learning results, NeurIPS) as a knowledge transfer graph. The teacher `t` is the
# exponential moving average of the student's weights after every update (decay 0.999): it
# has no optimizer and gets no gradient. It sees its own augmentation of each image and
# teaches the student through a consistency term (here KL at T = 1, where the paper takes the
# squared difference of the two class distributions). The averaged model is usually the one
# deployed, so it is the target.
graph mean_teacher

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

node s : resnet32
node t : ema(s, decay=0.999) [target, view=own]

label -> s : through
t     -> s : through kl(T=1)
