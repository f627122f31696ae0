# search_online.kt: one template over the online-distillation family. Three ResNet32 peers
# learn from the labels and from their ensemble; search chooses, for each construct, what
# ONE, OKDDip, KDCL and PCL chose by hand: whether peers 2 and 3 are branches on peer 1's
# trunk or whole networks, whether peer 1 (and so its branches) sees the shared batch or its own augmentation,
# whether the ensemble is the mean of the peers' logits or learned from the labels, whether
# peer 1's mean teacher (the moving average of its weights) teaches the others, and the
# temperature of every transfer. The target is peer 1.
graph search_online

data cifar100 {
  augment = pad_crop_flip
  val_split = 5000  # search scores trials on this split, never on the test set
}

train {
  epochs = 200
  batch = 128
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = step(milestones=[100, 150], gamma=0.1)
  seed = 0
}

node p1  : resnet32                                                [target, view=choice(shared, own)]
node p2  : choice(branch(p1, from=layer3), resnet32)  # a branch reads p1's view
node p3  : choice(branch(p1, from=layer3), resnet32)
node ens : ensemble(p1, p2, p3)                                    [combine=choice(mean_logits, learned)]
node m1  : choice(ema(p1, decay=0.999), ema(p1, decay=0.99), none)

label -> p1  : through
label -> p2  : through
label -> p3  : through
label -> ens : through  # kept in the trials whose ensemble is learned
ens   -> p1  : through kl(T=choice(1, 3))
ens   -> p2  : through kl(T=choice(1, 3))
ens   -> p3  : through kl(T=choice(1, 3))
m1    -> p2  : through kl(T=3)
m1    -> p3  : through kl(T=3)
