# pcl.kt: Peer Collaborative Learning (Wu and Gong 2021, Peer Collaborative Learning for
# Online Knowledge Distillation, AAAI) as a knowledge transfer graph. Three peers, each on its
# own random augmentation of every image, learn from the labels and from their peer ensemble
# teacher (here the mean of their logits, where PCL puts a classifier on their concatenated
# features). Each peer's temporal mean (an exponential moving average of its weights, decay
# 0.999) is its peer mean teacher and teaches the other peers. The first peer's mean teacher
# is the model deployed, so it is the target. PCL's peers are branches of one network; here
# they are whole networks (write `branch(p1, from=layer3)` for theirs).
graph pcl

data cifar100 {
  augment = pad_crop_flip
  val_split = 5000
}

train {
  epochs = 300
  batch = 128
  optimizer = sgd(lr=0.1, momentum=0.9, weight_decay=5e-4)
  schedule = step(milestones=[150, 225], gamma=0.1)
  seed = 0
}

node p1  : resnet32             [view=own]
node p2  : resnet32             [view=own]
node p3  : resnet32             [view=own]
node ens : ensemble(p1, p2, p3)
node m1  : ema(p1, decay=0.999) [target]
node m2  : ema(p2, decay=0.999)
node m3  : ema(p3, decay=0.999)

label -> p1 : through
label -> p2 : through
label -> p3 : through
ens   -> p1 : through kl(T=3)
ens   -> p2 : through kl(T=3)
ens   -> p3 : through kl(T=3)
m2    -> p1 : through kl(T=3)
m3    -> p1 : through kl(T=3)
m1    -> p2 : through kl(T=3)
m3    -> p2 : through kl(T=3)
m1    -> p3 : through kl(T=3)
m2    -> p3 : through kl(T=3)
