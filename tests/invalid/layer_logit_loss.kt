# layer_logit_loss.kt: a loss between outputs on an edge between layers
# expect: E320
graph layer_logit_loss
data digits { val_split = 300 }
node student : resnet20 [target]
node teacher : wrn16_2 [frozen]
label -> student : through
teacher.layer3 -> student.layer3 : through kl(T=4)
