# loss_unknown_argument.kt: an argument the loss does not take
# expect: E206
graph loss_unknown_argument
data digits { val_split = 300 }
node student : resnet20 [target]
node teacher : wrn16_2 [frozen]
label -> student : through
teacher.layer3 -> student.layer3 : through at(q=2)
