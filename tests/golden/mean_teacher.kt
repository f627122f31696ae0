# mean_teacher.kt: mean teachers (`ema`) of trained networks: one with the default decay
# (0.999), one the target, one a member of an ensemble and the source of a layer edge; and a
# template that decides whether a third exists and at which decay.
graph mean_teacher

data digits { val_split = 300 }

node a  : cnn_tiny
node b  : cnn_small
node ta : ema(a, decay=0.99)  [target]
node tb : ema(b)
node e  : ensemble(ta, tb)
node opt : choice(ema(b, decay=0.9), ema(b, decay=0.999), none)

edges label -> * : through
e -> a : correct kl(T=2)
ta.conv2 -> b.conv2 : through at(p=2)
tb -> b : through
opt -> a : linear
