# template.kt: every kind of search site the language has, to pin their names and order.
graph template

data digits {
  val_split = choice(200, 300)
  augment = choice(none, pad_crop)
}

train {
  epochs = choice(4, 8)
  batch = 64
  optimizer = sgd(lr=choice(0.1, 0.05), momentum=0.9)
  schedule = step(milestones=[2], gamma=choice(0.1, 0.5))
}

node a : cnn_tiny [target]
node b : choice(cnn_small, mlp)
node c : mlp [frozen]

label -> a : through
label -> b : choice(through, correct)
b     -> a : choice(linear, correct) kl(T=choice(1, 2, 4), weight=choice(0.5, 1.0))
c     -> a : through kl(T=2)
a     -> b : through
