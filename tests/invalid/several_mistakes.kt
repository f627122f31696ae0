# several_mistakes.kt: many mistakes in one file; every one is reported, in source order
# expect: E204 E205 E207 E200 E300 E306 E202 E201 E302 E303 E401 E402 E312
graph several_mistakes
data cifar1000 {
  val_split = 5000
  bach = 64
}
train {
  epochs = 200
  optimizer = adma(lr=0.001)
}
node student : resnet23  [target]
node peer    : resnet110
node peer    : wrn28_2
node helper  : resnet32  [target]
label   -> student : thorugh
label   -> peeer   : through
student -> label   : through
peer    -> peer    : through
peer    -> student : correct kl(T=0)
student -> peer    : through kl(weight=-1)
label   -> helper  : through kl(T=2)
